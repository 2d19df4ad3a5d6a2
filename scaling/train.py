"""Train one run: schedule, loop, evaluation, results, checkpoint and resume.

``train_run`` takes a resolved ``RunSpec`` and a sweep folder, trains the model to the run's
own token budget, and stores its curve and its row in the results store (``scaling.results``).
It is deterministic: the same spec and the same number of torch threads give bit-identical
losses on CPU, and a run that is killed and started again resumes from its newest checkpoint
and ends exactly where an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import scaling
from scaling import distributed, wsd
from scaling.checkpoint import checkpoint_path, load_checkpoint, remove_checkpoint, save_checkpoint
from scaling.data import Corpus, get_batch, load_corpus, val_windows
from scaling.errors import SpecError
from scaling.model.count import Counts, ModelShape, count
from scaling.model.gpt import GPT, MOE_STATS
from scaling.plan import planned_fields
from scaling.results import write_curve, write_run
from scaling.spec import RunSpec, TrainSpec

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class TrainingInterrupted(BaseException):
    """The run was asked to stop (SIGTERM or SIGUSR2) and left a checkpoint.

    A ``BaseException`` like ``KeyboardInterrupt``: it is not a failure of the run, so code
    that stores failures (``except Exception``) lets it pass.
    """


# --- schedule and evaluation points ------------------------------------------------------


def lr_at(step: int, steps: int, train: TrainSpec) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of a run of ``steps`` steps.

    Linear warm-up from zero over ``warmup_fraction`` of the steps, then ``constant``, a
    ``cosine`` decay that reaches ``min_lr_ratio * lr`` exactly at the last step, or ``wsd``
    (warm-up, stable, then a linear decay to ``min_lr_ratio * lr`` over the last
    ``cooldown_fraction`` of the steps, ending at the last step).
    """
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warmup = int(round(train.warmup_fraction * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    if train.schedule == "cosine":
        progress = (step - warmup) / max(1, steps - 1 - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    cooldown = max(1, int(round(train.cooldown_fraction * steps)))
    start = steps - cooldown
    if step < start:
        return peak
    return peak + (floor - peak) * (step - start + 1) / cooldown


def run_lr(step: int, run: RunSpec) -> float:
    """Learning rate of step ``step`` of ``run``: ``lr_at`` over its own steps, except that a
    WSD cooldown branch (``scaling.wsd``) follows its trunk's warm-up up to its branch point."""
    if run.branches and step < wsd.branch_point(run.steps, run.train):
        return lr_at(step, wsd.trunk_steps(run), run.train)
    return lr_at(step, run.steps, run.train)


def eval_steps(steps: int, points: int) -> list[int]:
    """Log-spaced step counts (1-based, after that many steps) to evaluate at; ends at ``steps``."""
    spaced = np.unique(np.round(np.geomspace(1, steps, num=points)).astype(int))
    return sorted({int(s) for s in spaced} | {steps})


# --- pieces of the loop ------------------------------------------------------------------


def build_optimizer(model: GPT, train: TrainSpec) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, embeddings or a tied head)."""
    no_decay = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in no_decay]
    other = [p for p in model.parameters() if p.dim() < 2 or id(p) in no_decay]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    # fused=True updates all parameters in one kernel: on one CPU core it took 0.20 ms a step
    # against 0.54 ms (foreach) at d_model 64, and 8.1 ms against 26.7 ms at d_model 256
    # (torch 2.13, 2-core Xeon with AVX-512); either way under 1% of a training step.
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)


def _autocast(train: TrainSpec) -> Any:
    if train.precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: GPT, windows: Tensor, batch_size: int, train: TrainSpec) -> float:
    """Mean cross-entropy of ``model`` on the fixed held-out ``windows`` ``[n, T + 1]``."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        with _autocast(train):
            _, _, stats = model(chunk[:, :-1], chunk[:, 1:])
        total += stats["ce_loss"].double() * len(chunk)
    model.train()
    return float(total / len(windows))


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While training: SIGTERM and SIGUSR2 only note the signal (in the yielded list).

    The loop checks the list after each step, writes a checkpoint and calls ``redeliver``.
    The previous handlers are restored on the way out. Outside the main thread (where
    handlers cannot be installed) nothing is caught.
    """
    caught: list[int] = []
    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    except ValueError:
        log.debug("not the main thread: no checkpoint on SIGTERM/SIGUSR2")
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def redeliver(signum: int, *, finished: bool) -> None:
    """Send ``signum`` again, now to the handler that was there before training (after
    ``stop_signals`` restored it). If that handler returns and the run is not finished,
    stop it anyway with ``TrainingInterrupted``."""
    os.kill(os.getpid(), signum)
    if not finished:
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"stopped by {name}; a checkpoint was written")


# --- the loop ----------------------------------------------------------------------------


class _Loop:
    """The state of one training run between steps, and the steps themselves."""

    def __init__(self, run: RunSpec, corpus: Corpus, ckpt: Path) -> None:
        self.run, self.train, self.corpus, self.ckpt = run, run.train, corpus, ckpt
        self.shape = ModelShape(**run.shape)
        self.counts: Counts = count(self.shape)
        self.flops = self.counts.flops(run.flops)
        self.batch, self.micro = _batch_sizes(run)
        self.evals = set(eval_steps(run.steps, self.train.eval_points))
        self.trunk_saves = wsd.trunk_saves(run) if run.branches else set()
        if run.branches:  # a WSD branch: the trunk's points, placed alike in every branch
            trunk_evals = eval_steps(wsd.trunk_steps(run), self.train.eval_points)
            self.evals = wsd.eval_points(run, trunk_evals)
        self.val = val_windows(corpus, run.data.seq_len, run.data.val_tokens)

        torch.manual_seed(self.train.seed)
        self.model = GPT(self.shape, run.model)
        # In a torch.distributed process group: DDP for the training forward (averages the
        # gradients over ranks); each rank trains on its share of every batch.
        self.forward = distributed.wrap(self.model, find_unused=self.shape.n_moe_layers > 0)
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(self.model, self.train)

        self.step = 0  # optimiser steps done; also the data position
        self.curve: list[dict] = []
        self.pending: list[tuple[Tensor, Tensor]] = []  # (ce, moe stats) since the last row
        self.val_loss: float | None = None
        self.wall_before = 0.0  # seconds spent by earlier attempts of this run
        self.started_at = datetime.now(UTC)

    # checkpoints --------------------------------------------------------------------------

    def resume(self) -> None:
        state = load_checkpoint(self.ckpt, self.run.run_id)
        if state is None and self.run.branches:
            # A WSD branch starts from the newest checkpoint its trunk left on the way.
            start = wsd.trunk_start(self.ckpt.parent.parent, self.run)
            state = load_checkpoint(*start) if start is not None else None
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self.curve = state["curve"]
        self.pending = state["pending"]
        self.val_loss = state["val_loss"]
        self.wall_before = state["wall_seconds"]
        self.started_at = datetime.fromisoformat(state["started_at"])
        log.info("run %s: resuming at step %d/%d", self.run.run_id, self.step, self.run.steps)

    def save(self, wall: float, path: Path | None = None, run_id: str | None = None) -> None:
        """Checkpoint the run (or, with ``path`` and ``run_id``, a WSD trunk point)."""
        if distributed.rank() != 0:
            return
        state = {
            "run_id": run_id or self.run.run_id,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "curve": self.curve,
            "pending": self.pending,
            "val_loss": self.val_loss,
            "wall_seconds": wall,
            "started_at": self.started_at.isoformat(),
        }
        save_checkpoint(path or self.ckpt, state)
        log.debug("run %s: checkpoint at step %d", self.run.run_id, self.step)

    # one step -----------------------------------------------------------------------------

    def train_step(self, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        """One optimiser step; returns (cross-entropy, MoE stats, gradient norm), unsynced."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seq_len = self.run.data.seq_len
        x, y = get_batch(self.corpus, self.batch, seq_len, self.train.seed, self.step)
        x, y = distributed.shard(x), distributed.shard(y)
        micro = min(self.micro, len(x))
        n_micro = len(x) // micro
        ce = torch.zeros(())
        moe = torch.zeros(len(MOE_STATS))
        for i in range(n_micro):
            part = slice(i * micro, (i + 1) * micro)
            with _autocast(self.train):
                _, loss, stats = self.forward(x[part], y[part])
            # Each micro-batch's mean loss is divided by their number, so the gradient is the
            # mean over the whole batch, as if it were one forward pass.
            (loss / n_micro).backward()
            ce += stats["ce_loss"] / n_micro
            if "aux_loss" in stats:
                moe += torch.stack([stats[k] for k in MOE_STATS]) / n_micro
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        return distributed.mean(ce), distributed.mean(moe), grad_norm

    def finish_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # curve rows ---------------------------------------------------------------------------

    def add_row(self, lr: float, grad_norm: float, tokens_per_second: float) -> dict:
        ce = torch.stack([c for c, _ in self.pending]).mean()
        moe = torch.stack([m for _, m in self.pending]).mean(0).tolist()
        self.pending = []
        tokens = self.step * self.train.batch_tokens
        row = {
            "step": self.step,
            "tokens": tokens,
            "compute": tokens * self.flops,
            "train_loss": float(ce),
            "val_loss": None,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
        }
        if self.shape.n_moe_layers:
            row.update(zip(MOE_STATS, moe, strict=True))
        if self.step in self.evals:
            self.val_loss = evaluate(self.model, self.val, self.micro, self.train)
            row["val_loss"] = self.val_loss
        self.curve.append(row)
        return row


def _batch_sizes(run: RunSpec) -> tuple[int, int]:
    """Sequences per step and per forward pass, checked against ``seq_len``."""
    seq_len, train = run.data.seq_len, run.train
    if train.batch_tokens % seq_len:
        raise SpecError(
            f"train.batch_tokens = {train.batch_tokens}: not a multiple of data.seq_len = {seq_len}"
        )
    micro_tokens = train.micro_batch_tokens or train.batch_tokens
    if micro_tokens % seq_len or train.batch_tokens % micro_tokens:
        raise SpecError(
            f"train.micro_batch_tokens = {micro_tokens}: must be a multiple of data.seq_len = "
            f"{seq_len} that divides train.batch_tokens = {train.batch_tokens}"
        )
    batch, micro = train.batch_tokens // seq_len, micro_tokens // seq_len
    ranks = distributed.world_size()
    if batch % ranks or (batch // ranks > micro and (batch // ranks) % micro):
        raise SpecError(
            f"train.batch_tokens = {train.batch_tokens}: {batch} sequences do not split over "
            f"{ranks} processes in whole micro-batches of {micro}"
        )
    return batch, micro


def _is_finite(ce: Tensor, grad_norm: Tensor) -> bool:
    # One cheap check (and the step's only sync) covers both: inf or nan in either makes
    # the sum non-finite.
    return bool(torch.isfinite(ce + grad_norm))


# --- the entry point ---------------------------------------------------------------------


def train_run(
    run: RunSpec,
    sweep_dir: Path,
    *,
    corpus: Corpus | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train ``run``, store its curve and row under ``sweep_dir``, and return the row.

    Parameters
    ----------
    run
        The resolved run; its ``shape`` gives the model, ``train`` the recipe.
    sweep_dir
        The sweep's results folder (``runs/``, ``curves/`` and ``checkpoints/`` inside).
    corpus
        The corpus of ``run.data``, when the caller has it loaded already.
    progress
        Called as ``progress(step, steps)`` after every step.

    Returns
    -------
    dict
        The stored row (``scaling.results.RUNS_SCHEMA``): status ``done``, or ``diverged``
        when the loss or the gradient norm stopped being finite (the run ends at that step;
        the curve keeps only the finite rows).

    Raises
    ------
    TrainingInterrupted
        SIGTERM or SIGUSR2 arrived, a checkpoint was written and the previous handler of
        the signal returned; running the same call again resumes.
    """
    sweep_dir = Path(sweep_dir)
    corpus = corpus if corpus is not None else load_corpus(run.data)
    shape = ModelShape(**run.shape)
    if corpus.vocab_size > shape.vocab_size:
        raise SpecError(
            f"shape.vocab_size = {shape.vocab_size}: smaller than the vocabulary of corpus "
            f"{corpus.name!r} ({corpus.vocab_size})"
        )
    threads_before = torch.get_num_threads()
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    try:
        loop = _Loop(run, corpus, checkpoint_path(sweep_dir, run.run_id))
        loop.resume()
        error, wall, caught = _train(loop, progress)
    finally:
        torch.set_num_threads(threads_before)
    if caught is not None and loop.step < run.steps and error is None:
        redeliver(caught, finished=False)

    row = _run_row(loop, error, wall)
    if distributed.rank() == 0:  # one writer in a process group
        write_curve(sweep_dir, run.run_id, loop.curve)
        write_run(sweep_dir, row)
        remove_checkpoint(loop.ckpt)
        if run.branches:
            wsd.remove_unneeded(sweep_dir, run)
    if caught is not None:
        redeliver(caught, finished=True)  # the run is stored; now stop as asked
    return row


def _train(
    loop: _Loop, progress: Callable[[int, int], None] | None
) -> tuple[str | None, float, int | None]:
    """Run the remaining steps; returns the divergence message (or None), the wall seconds
    of the run so far and the stop signal that arrived (or None)."""
    run, train = loop.run, loop.train
    started = time.perf_counter()
    interval_start, interval_steps = started, 0
    error = None
    with stop_signals() as caught:
        while loop.step < run.steps:
            lr = run_lr(loop.step, run)
            ce, moe, grad_norm = loop.train_step(lr)
            if not _is_finite(ce, grad_norm):
                error = (
                    f"non-finite loss or gradient norm at step {loop.step + 1} "
                    f"(loss {float(ce)}, grad norm {float(grad_norm)}, lr {lr:.3g})"
                )
                log.warning("run %s diverged: %s", run.run_id, error)
                break
            loop.finish_step()
            loop.pending.append((ce, moe))
            interval_steps += 1

            step = loop.step
            if step % train.log_interval == 0 or step in loop.evals or step == run.steps:
                now = time.perf_counter()
                speed = interval_steps * train.batch_tokens / max(now - interval_start, 1e-9)
                row = loop.add_row(lr, float(grad_norm), speed)
                _log_row(loop, row)
                interval_start, interval_steps = time.perf_counter(), 0

            wall = loop.wall_before + time.perf_counter() - started
            if run.branches and step in loop.trunk_saves:
                sweep_dir = loop.ckpt.parent.parent
                path = wsd.trunk_checkpoint(sweep_dir, run, step)
                if not path.exists():  # for the longer branches of this trunk
                    loop.save(wall, path, wsd.trunk_checkpoint_id(run, step))
            if caught or (train.checkpoint_interval and step % train.checkpoint_interval == 0):
                if step < run.steps:
                    loop.save(wall)
            if caught and step < run.steps:
                break
            if progress is not None:
                progress(step, run.steps)
    wall = loop.wall_before + time.perf_counter() - started
    return error, wall, (caught[0] if caught else None)


def _log_row(loop: _Loop, row: dict) -> None:
    val = f" | val {row['val_loss']:.4f}" if row["val_loss"] is not None else ""
    log.info(
        "run %s step %d/%d | tokens %d | loss %.4f%s | lr %.3g | grad norm %.3f | %.0f tok/s"
        " | %.2f GFLOP/s",
        loop.run.run_id,
        row["step"],
        loop.run.steps,
        row["tokens"],
        row["train_loss"],
        val,
        row["lr"],
        row["grad_norm"],
        row["tokens_per_second"],
        row["tokens_per_second"] * loop.counts.flops_per_token / 1e9,
    )


def _run_row(loop: _Loop, error: str | None, wall: float) -> dict:
    """The run's row for ``RUNS_SCHEMA``."""
    run = loop.run
    last = loop.curve[-1] if loop.curve else {}
    return {
        **planned_fields(run),
        "status": "diverged" if error else "done",
        "error": error,
        "loss": None if error else loop.val_loss,
        "val_loss": loop.val_loss,
        "train_loss": last.get("train_loss"),
        "corpus": loop.corpus.name,
        "corpus_id": loop.corpus.corpus_id,
        "corpus_tokens": loop.corpus.n_tokens,
        "wall_seconds": wall,
        "tokens_per_second": loop.step * run.train.batch_tokens / max(wall, 1e-9),
        "started_at": loop.started_at,
        "finished_at": datetime.now(UTC),
        "host": socket.gethostname(),
        "scaling_version": scaling.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
    }

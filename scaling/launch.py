"""Executors: run the planned runs of a sweep, skipping what is already stored.

Two executors share one contract. ``local`` trains runs one after another in this process,
or in a pool of worker processes; ``slurm`` (``scaling.slurm``) submits them as the tasks
of one job array. Either way every run goes through ``execute_run``, wherever it executes:
it takes the run's lock file first (``locks/RUN_ID.lock``, an exclusive ``flock``) and
checks the store again once it holds it, so two ``scaling run`` commands on the same sweep
never train the same run twice. A run that raises is stored as ``failed`` with the error's
last lines; the others go on. Neither the trainer nor the store knows which executor ran.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from scaling.plan import PlannedRun, plan_sweep, planned_fields
from scaling.results import load_runs, read_run, write_run
from scaling.spec import RunSpec, SweepSpec
from scaling.status import read_progress, write_progress

log = logging.getLogger(__name__)

FINISHED = ("done", "diverged")
PROGRESS_SECONDS = 2.0  # how often a running run refreshes its progress file


@dataclass
class SweepOutcome:
    """What one `scaling run` did."""

    sweep_dir: Path
    planned: int
    skipped: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # being trained by another process or job
    submitted: list[str] = field(default_factory=list)  # handed to the scheduler (slurm)


def stored_status(sweep_dir: Path) -> dict[str, str]:
    """Run id to stored status for the runs of ``sweep_dir``."""
    if not (sweep_dir / "runs").is_dir():
        return {}
    runs = load_runs(sweep_dir)
    return dict(zip(runs["run_id"], runs["status"], strict=True))


def to_do(
    planned: list[PlannedRun], stored: dict[str, str], retry_failed: bool
) -> list[PlannedRun]:
    """The planned runs that still need training."""
    keep = FINISHED if retry_failed else (*FINISHED, "failed")
    return [p for p in planned if stored.get(p.run.run_id) not in keep]


@contextmanager
def run_lock(sweep_dir: Path, run_id: str) -> Iterator[bool]:
    """Hold the run's lock file if no other process does; yield whether we got it."""
    lock_dir = sweep_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{run_id}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def failed_row(run: RunSpec, error: BaseException | str, **extra: object) -> dict:
    """The stored row of a run that raised: its counts, status `failed`, the error's tail."""
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    return {
        **planned_fields(run),
        "status": "failed",
        "error": "\n".join(text.strip().splitlines()[-20:]),
        "finished_at": datetime.now(UTC),
        "host": socket.gethostname(),
        **extra,
    }


def execute_run(
    run: RunSpec,
    sweep_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    extra: dict[str, object] | None = None,
) -> str:
    """Train one run under its lock, store a `failed` row if it raises; return its status.

    Returns ``"busy"`` when another process holds the run, ``"skipped"`` when its result
    appeared while we waited. This is what every executor calls, in whatever process.
    ``extra`` adds columns to a `failed` row (the SLURM job id and state). In a
    torch.distributed process group, rank 0 takes the lock and decides for all ranks.
    """
    from scaling import distributed
    from scaling.train import train_run  # torch is imported only where runs train

    leader = distributed.rank() == 0
    lock = run_lock(sweep_dir, run.run_id) if leader else nullcontext(True)
    with lock as mine:
        decision = "train"
        if leader and not mine:
            decision = "busy"
        elif leader:
            stored = read_run(sweep_dir, run.run_id)
            if stored is not None and stored["status"] in FINISHED:
                decision = "skipped"
        decision = distributed.broadcast(decision)
        if decision != "train":
            return decision
        report = _with_progress_file(run, sweep_dir, progress) if leader else progress
        try:
            row = train_run(run, sweep_dir, progress=report)
        except Exception as exc:  # noqa: BLE001 - any failure of one run is stored, others go on
            log.error("run %s failed: %s", run.run_id, exc)
            if leader:
                write_run(sweep_dir, failed_row(run, exc, **(extra or {})))
            return "failed"
        return str(row["status"])


def _with_progress_file(
    run: RunSpec, sweep_dir: Path, progress: Callable[[int, int], None] | None
) -> Callable[[int, int], None]:
    """Wrap ``progress`` so that the run's progress file is refreshed every few seconds."""
    last = [0.0]

    def report(step: int, steps: int) -> None:
        now = time.monotonic()
        if step == steps or now - last[0] > PROGRESS_SECONDS:
            last[0] = now
            write_progress(sweep_dir, run.run_id, step, steps, step * run.train.batch_tokens)
        if progress is not None:
            progress(step, steps)

    return report


def _worker(run_json: str, sweep_dir: str, threads: int) -> tuple[str, str]:
    import torch

    torch.set_num_threads(threads)
    run = RunSpec.model_validate_json(run_json)
    return run.run_id, execute_run(run, Path(sweep_dir))


def run_sweep(
    spec: SweepSpec,
    results_root: Path,
    *,
    workers: int | None = None,
    retry_failed: bool = False,
    show_progress: bool = True,
    wait: bool = True,
) -> SweepOutcome:
    """Plan ``spec`` and train what is missing from ``results_root / spec.name``.

    With ``launch.executor: slurm`` the missing runs are submitted as one job array;
    ``wait`` then says whether to wait for the tasks (their results are stored by the
    tasks themselves either way).
    """
    planned = plan_sweep(spec)
    # Load (and build, the first time) the corpus before anything is written or run, so a
    # bad corpus path fails here and worker processes find the cache ready.
    from scaling.data import load_corpus

    load_corpus(spec.data)

    sweep_dir = Path(results_root) / spec.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic_text(sweep_dir / "sweep.json", spec.model_dump_json(indent=2))

    stored = stored_status(sweep_dir)
    pending = to_do(planned, stored, retry_failed)
    outcome = SweepOutcome(sweep_dir=sweep_dir, planned=len(planned))
    outcome.skipped = [p.run.run_id for p in planned if p not in pending]
    if outcome.skipped:
        log.info(
            "%d of %d runs already stored; training %d",
            len(outcome.skipped),
            len(planned),
            len(pending),
        )
    if spec.launch.executor == "slurm":
        from scaling.slurm import submit_sweep

        submit_sweep(
            spec.launch,
            pending,
            sweep_dir,
            outcome,
            retry_failed=retry_failed,
            wait=wait,
            show_progress=show_progress,
        )
        return outcome
    workers = workers or spec.launch.workers
    if workers == 1:
        _run_sequential(pending, sweep_dir, outcome, show_progress)
    else:
        _run_pool(pending, sweep_dir, outcome, workers, show_progress)
    return outcome


def _write_atomic_text(path: Path, text: str) -> None:
    """Write through a temporary name unique to this process, so concurrent commands and
    readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _record(outcome: SweepOutcome, run_id: str, status: str) -> None:
    if status == "busy":
        outcome.busy.append(run_id)
    elif status == "failed":
        outcome.failed.append(run_id)
    elif status == "skipped":
        outcome.skipped.append(run_id)
    else:
        outcome.trained.append(run_id)


def _run_sequential(
    pending: list[PlannedRun], sweep_dir: Path, outcome: SweepOutcome, show: bool
) -> None:
    total = sum(p.run.steps for p in pending)
    with tqdm(
        total=total,
        unit="step",
        disable=not show or not pending,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        for i, planned in enumerate(pending, 1):
            bar.set_description(f"run {i}/{len(pending)} N={planned.counts.params:,}")
            done_before = bar.n

            def progress(step: int, steps: int, start: int = done_before) -> None:
                bar.update(start + step - bar.n)

            status = execute_run(planned.run, sweep_dir, progress)
            bar.update(done_before + planned.run.steps - bar.n)
            _record(outcome, planned.run.run_id, status)


def _run_pool(
    pending: list[PlannedRun], sweep_dir: Path, outcome: SweepOutcome, workers: int, show: bool
) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    # Largest runs first, so the pool does not end on one long run.
    pending = sorted(pending, key=lambda p: -p.estimated_seconds)
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(
                _worker, p.run.model_dump_json(), str(sweep_dir), p.run.train.threads or threads
            )
            for p in pending
        ]
        _follow(futures, pending, sweep_dir, outcome, show)


def _follow(
    futures: list, pending: list[PlannedRun], sweep_dir: Path, outcome: SweepOutcome, show: bool
) -> None:
    """Record each run as its worker finishes; show the steps of all runs in one bar, read
    from the progress files the workers refresh."""
    steps = {p.run.run_id: p.run.steps for p in pending}
    runs = dict(zip(futures, pending, strict=True))
    finished: set[str] = set()
    waiting = set(futures)
    with tqdm(
        total=sum(steps.values()),
        unit="step",
        disable=not show or not futures,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        while waiting:
            done, waiting = wait(waiting, timeout=2.0, return_when=FIRST_COMPLETED)
            for future in done:
                run_id, status = future.result()
                _record(outcome, run_id, status)
                finished.add(runs[future].run.run_id)
            position = sum(steps[r] for r in finished)
            for run_id in set(steps) - finished:
                progress = read_progress(sweep_dir, run_id)
                position += progress["step"] if progress else 0
            bar.set_description(f"{len(finished)}/{len(steps)} runs done")
            bar.update(position - bar.n)

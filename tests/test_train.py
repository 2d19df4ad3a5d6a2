"""The trainer: results it stores, schedule, accumulation, divergence, determinism, resume."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from scaling.checkpoint import checkpoint_path
from scaling.data import load_corpus
from scaling.model.count import ModelShape, count
from scaling.results import CURVES_SCHEMA, RUNS_SCHEMA, load_curves, load_runs
from scaling.spec import DataSpec, ModelSpec, RunSpec, TrainSpec
from scaling.train import eval_steps, lr_at, train_run

SEQ_LEN = 16


@pytest.fixture
def text(tmp_path: Path) -> Path:
    """A small byte corpus: this package's own source, a few times over."""
    source = b"".join(p.read_bytes() for p in sorted(Path("scaling").rglob("*.py")))
    path = tmp_path / "corpus.txt"
    path.write_bytes(source[:60_000])
    return path


def make_run(corpus: Path, steps: int = 12, d_model: int = 32, **train: object) -> RunSpec:
    shape = ModelShape(
        vocab_size=256, seq_len=SEQ_LEN, n_layers=1, d_model=d_model, n_heads=1, d_ff=64
    )
    settings = dict(batch_tokens=8 * SEQ_LEN, log_interval=4, eval_points=3, threads=1)
    settings.update(train)
    return RunSpec(
        sweep="test",
        data=DataSpec(corpus=str(corpus), seq_len=SEQ_LEN, val_tokens=20 * (SEQ_LEN + 1)),
        model=ModelSpec(),
        train=TrainSpec(**settings),
        shape=shape.to_dict(),
        steps=steps,
        tokens=steps * int(settings["batch_tokens"]),
        target_params=1e4,
    )


def test_train_run_stores_row_and_curve(text: Path, tmp_path: Path) -> None:
    run = make_run(text)
    calls = []
    row = train_run(run, tmp_path / "sweep", progress=lambda s, n: calls.append((s, n)))
    assert calls == [(s, 12) for s in range(1, 13)]

    runs = load_runs(tmp_path / "sweep")
    assert len(runs) == 1 and list(runs.columns) == RUNS_SCHEMA.names
    stored = runs.iloc[0]
    counts = count(ModelShape(**run.shape))
    assert stored["status"] == "done" and stored["run_id"] == run.run_id == row["run_id"]
    assert stored["params"] == counts.params
    assert stored["compute"] == run.tokens * counts.flops_6n
    assert stored["compute_shape"] == run.tokens * counts.flops_per_token
    assert stored["corpus_id"] == load_corpus(run.data).corpus_id
    assert stored["loss"] == stored["val_loss"] and 0 < stored["loss"] < math.log(256) + 0.5
    assert RunSpec.model_validate_json(stored["spec"]) == run
    unfilled = [k for k in RUNS_SCHEMA.names if pd.isna(stored[k])]
    assert set(unfilled) <= {
        "error", "target_compute", "branched_from", "job_id", "slurm_state"
    }  # fmt: skip

    curve = load_curves(tmp_path / "sweep")
    assert list(curve.columns) == CURVES_SCHEMA.names
    logged = sorted({4, 8, 12} | set(eval_steps(12, 3)))
    assert curve["step"].tolist() == logged
    assert curve.dropna(subset=["val_loss"])["step"].tolist() == eval_steps(12, 3)
    assert curve["val_loss"].iloc[-1] == stored["loss"]
    assert curve["tokens"].tolist() == [s * 8 * SEQ_LEN for s in logged]
    assert not checkpoint_path(tmp_path / "sweep", run.run_id).exists()


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_schedules(schedule: str) -> None:
    train = TrainSpec(
        lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1, cooldown_fraction=0.2, schedule=schedule
    )
    lrs = [lr_at(s, 100, train) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(lrs) == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[10:] == [1.0] * 90
    else:
        assert lrs[-1] == pytest.approx(0.1)  # the floor exactly at the last step
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    if schedule == "wsd":
        assert lrs[10:80] == [1.0] * 70 and lrs[80] < 1.0


def test_accumulation_gives_the_same_step(text: Path, tmp_path: Path) -> None:
    whole = make_run(text, steps=2, batch_tokens=32 * SEQ_LEN, log_interval=1)
    parts = make_run(
        text, steps=2, batch_tokens=32 * SEQ_LEN, micro_batch_tokens=8 * SEQ_LEN, log_interval=1
    )
    train_run(whole, tmp_path / "a")
    train_run(parts, tmp_path / "b")
    a, b = load_curves(tmp_path / "a"), load_curves(tmp_path / "b")
    for column in ("train_loss", "grad_norm", "val_loss"):
        assert b[column].tolist() == pytest.approx(a[column].tolist(), rel=1e-5)


def test_divergence_stops_within_a_step(text: Path, tmp_path: Path) -> None:
    run = make_run(text, steps=40, lr=1e6, grad_clip=0.0, warmup_fraction=0.0, log_interval=1)
    row = train_run(run, tmp_path / "sweep")
    assert row["status"] == "diverged" and "non-finite" in row["error"]
    assert row["loss"] is None
    curve = load_curves(tmp_path / "sweep")
    assert len(curve) < 40
    numeric = curve[["train_loss", "grad_norm", "lr", "tokens_per_second"]]
    assert numeric.map(math.isfinite).all().all()
    assert load_runs(tmp_path / "sweep").iloc[0]["status"] == "diverged"


def test_same_seed_same_loss(text: Path, tmp_path: Path) -> None:
    first = train_run(make_run(text), tmp_path / "a")
    second = train_run(make_run(text), tmp_path / "b")
    other = train_run(make_run(text, seed=1), tmp_path / "c")
    assert first["loss"] == second["loss"] and first["train_loss"] == second["train_loss"]
    assert other["loss"] != first["loss"]


def test_moe_run_logs_router_losses(text: Path, tmp_path: Path) -> None:
    pytest.importorskip("scaling.model.moe")
    run = make_run(text, steps=4, log_interval=2)
    shape = {**run.shape, "family": "moe", "num_experts": 4, "top_k": 2}
    run = run.model_copy(update={"shape": shape, "model": ModelSpec(family="moe", num_experts=4)})
    row = train_run(run, tmp_path / "sweep")
    assert row["status"] == "done" and row["num_experts"] == 4
    assert row["params"] == count(ModelShape(**shape)).params
    curve = load_curves(tmp_path / "sweep")
    assert curve[["aux_loss", "z_loss", "dropped_fraction"]].notna().all().all()
    assert (curve["aux_loss"] > 0).all()


def test_bf16_runs(text: Path, tmp_path: Path) -> None:
    row = train_run(make_run(text, steps=4, precision="bf16"), tmp_path / "sweep")
    assert row["status"] == "done" and math.isfinite(row["loss"])


# --- checkpoint and resume -------------------------------------------------------------

CHILD = """
import os, signal, sys, time
from pathlib import Path
from scaling.spec import RunSpec
from scaling.train import train_run

run = RunSpec.model_validate_json(Path(sys.argv[1]).read_text())
sweep, marker, at, action = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def progress(step, steps):
    if step == at:
        if action == "sleep":
            marker.write_text(str(step))
            time.sleep(120)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

train_run(run, sweep, progress=progress)
"""


def _child(run: RunSpec, tmp_path: Path, at: int, action: str) -> subprocess.Popen:
    spec = tmp_path / "run.json"
    spec.write_text(run.model_dump_json())
    args = [str(spec), str(tmp_path / "sweep"), str(tmp_path / "marker"), str(at), action]
    return subprocess.Popen([sys.executable, "-c", CHILD, *args])


def _same_curves(a: pd.DataFrame, b: pd.DataFrame) -> None:
    columns = [c for c in CURVES_SCHEMA.names if c != "tokens_per_second"]
    pd.testing.assert_frame_equal(a[columns], b[columns])


def test_sigkill_then_resume_is_bit_identical(text: Path, tmp_path: Path) -> None:
    run = make_run(text, steps=12, checkpoint_interval=4, log_interval=2)
    reference = train_run(run, tmp_path / "reference")

    child = _child(run, tmp_path, at=6, action="sleep")
    deadline = time.monotonic() + 60
    while not (tmp_path / "marker").exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    ckpt = checkpoint_path(tmp_path / "sweep", run.run_id)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    assert not (tmp_path / "sweep" / "runs").exists()

    steps = []
    resumed = train_run(run, tmp_path / "sweep", progress=lambda s, n: steps.append(s))
    assert steps == list(range(5, 13))  # no step repeated, none skipped
    assert resumed["loss"] == reference["loss"]
    assert resumed["train_loss"] == reference["train_loss"]
    _same_curves(load_curves(tmp_path / "sweep"), load_curves(tmp_path / "reference"))
    assert not ckpt.exists()


def test_sigterm_checkpoints_and_stops(text: Path, tmp_path: Path) -> None:
    run = make_run(text, steps=12)
    reference = train_run(run, tmp_path / "reference")

    child = _child(run, tmp_path, at=6, action="term")
    assert child.wait(timeout=60) == -signal.SIGTERM  # the default action ran after saving
    ckpt = checkpoint_path(tmp_path / "sweep", run.run_id)
    assert torch.load(ckpt, weights_only=True)["step"] == 7  # the step in flight finished

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    resumed = train_run(run, tmp_path / "sweep")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == before
    assert resumed["loss"] == reference["loss"]
    _same_curves(load_curves(tmp_path / "sweep"), load_curves(tmp_path / "reference"))


def test_unusable_checkpoint_is_set_aside(text: Path, tmp_path: Path) -> None:
    run = make_run(text, steps=4)
    ckpt = checkpoint_path(tmp_path / "sweep", run.run_id)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="cannot resume"):
        row = train_run(run, tmp_path / "sweep")
    assert row["status"] == "done"
    assert ckpt.with_name(ckpt.name + ".unusable").exists()

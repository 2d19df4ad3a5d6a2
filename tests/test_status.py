"""`scaling status`: states from the store, locks, checkpoints, progress files and SLURM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from scaling import slurm
from scaling.cli import cli
from scaling.launch import failed_row, run_lock
from scaling.plan import plan_sweep
from scaling.results import write_run
from scaling.spec import parse_sweep
from scaling.status import summary_line, sweep_status, write_progress

TEXT = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(500))


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """A planned sweep of six runs with nothing trained: sweep.json only."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    raw = {
        "name": "tiny",
        "data": {"corpus": str(corpus), "seq_len": 32},
        "model": {"head_dim": 8, "aspect_ratio": 16},
        "train": {"batch_tokens": 256},
        "plan": {"kind": "grid", "params": [2.0e3, 5.0e3], "tokens": [4.0e3, 8.0e3, 1.6e4]},
    }
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(raw))
    return folder


def _runs(sweep_dir: Path) -> list:
    spec = parse_sweep(json.loads((sweep_dir / "sweep.json").read_text()))
    return [p.run for p in plan_sweep(spec)]


def _store_done(sweep_dir: Path, run: object, loss: float) -> None:
    row = failed_row(run, "")
    row.update(status="done", error=None, loss=loss, job_id="5_0")
    write_run(sweep_dir, row)


def test_states_from_store_locks_checkpoints_and_progress(sweep_dir: Path) -> None:
    runs = _runs(sweep_dir)
    _store_done(sweep_dir, runs[0], 4.5)
    write_run(sweep_dir, failed_row(runs[1], ValueError("bad batch")))
    # runs[2] is training in some process: it holds the lock and reports progress.
    write_progress(sweep_dir, runs[2].run_id, 5, 20, 1280)
    # runs[3] was stopped with a checkpoint and no process holds it.
    (sweep_dir / "checkpoints").mkdir()
    (sweep_dir / "checkpoints" / f"{runs[3].run_id}.pt").write_bytes(b"")
    write_progress(sweep_dir, runs[3].run_id, 10, 20, 2560)

    with run_lock(sweep_dir, runs[2].run_id):
        table = sweep_status(sweep_dir).set_index("run_id")
    states = [table.loc[r.run_id, "state"] for r in runs]
    assert states == ["done", "failed", "running", "preempted", "pending", "pending"]
    assert table.loc[runs[0].run_id, "loss"] == 4.5
    assert table.loc[runs[0].run_id, "progress"] == "100%"
    assert table.loc[runs[2].run_id, "tokens_done"] == 1280
    assert "ValueError: bad batch" in table.loc[runs[1].run_id, "error"]

    line = summary_line(sweep_status(sweep_dir))
    assert line.startswith("6 runs: 1 done, 1 failed, 1 preempted, 3 pending;")


def test_slurm_states_of_submitted_runs(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _runs(sweep_dir)
    _store_done(sweep_dir, runs[0], 4.0)
    jobs = {r.run_id: {"job_id": f"9_{i}", "spec": r.model_dump_json()} for i, r in enumerate(runs)}
    (sweep_dir / "jobs.json").write_text(json.dumps({"runs": jobs}))
    (sweep_dir / "checkpoints").mkdir()
    (sweep_dir / "checkpoints" / f"{runs[3].run_id}.pt").write_bytes(b"")
    scheduler = {
        "9_0": "COMPLETED",
        "9_1": "RUNNING",
        "9_2": "PENDING",
        "9_3": "REQUEUED",  # requeued with a checkpoint: waiting to resume
        "9_4": "CANCELLED",  # killed from outside, nothing stored
        "9_5": "TIMEOUT",  # out of requeues, no checkpoint
    }
    asked: list = []
    monkeypatch.setattr(
        slurm, "job_states", lambda ids: asked.extend(ids) or {i: scheduler[i] for i in ids}
    )

    table = sweep_status(sweep_dir).set_index("run_id")
    assert "9_0" not in asked, "finished runs are not asked about"
    got = [(table.loc[r.run_id, "state"], table.loc[r.run_id, "job_id"]) for r in runs]
    assert got == [
        ("done", "9_0"),
        ("running", "9_1"),
        ("pending", "9_2"),
        ("preempted", "9_3"),
        ("failed", "9_4"),
        ("preempted", "9_5"),
    ]
    assert table.loc[runs[4].run_id, "slurm_state"] == "CANCELLED"
    assert "ended CANCELLED" in table.loc[runs[4].run_id, "error"]

    out = CliRunner().invoke(cli, ["status", str(sweep_dir), "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["summary"] == {"done": 1, "running": 1, "pending": 1, "preempted": 2, "failed": 1}
    assert shown["summary_line"].startswith("6 runs: 1 done, 1 failed, 1 running, 2 preempted")

    text = CliRunner().invoke(cli, ["status", str(sweep_dir)]).output
    assert "slurm_state" in text and "ended CANCELLED" in text


def test_unknown_scheduler_still_shows_the_store(
    sweep_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _runs(sweep_dir)
    (sweep_dir / "jobs.json").write_text(json.dumps({"runs": {runs[0].run_id: {"job_id": "3"}}}))

    def unreachable(ids: list) -> dict:
        raise slurm.LaunchError("cannot reach the SLURM cluster")

    monkeypatch.setattr(slurm, "job_states", unreachable)
    table = sweep_status(sweep_dir)
    assert set(table["state"]) == {"pending"} and table["job_id"].iloc[0] == "3"

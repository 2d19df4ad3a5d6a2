"""Sweeps through `scaling run --executor slurm` on a real cluster.

Each task pays an interpreter start and a torch import (a few seconds on a loaded 2-core
machine), so the sweeps are few and tiny, and one test covers several steps of a story.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from scaling.cli import cli
from scaling.errors import LaunchError
from scaling.launch import run_sweep
from scaling.plan import plan_sweep
from scaling.results import load_runs, read_run
from scaling.slurm import make_executor, preflight, read_jobs
from scaling.spec import load_sweep
from scaling.status import sweep_status
from scaling.train import train_run

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000))


@pytest.fixture
def make_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slurm_cluster: SlurmCluster):
    """Write a tiny sweep spec; the tasks find the corpus cache through the environment."""
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)

    def make(plan: dict, train: dict | None = None, **launch: object) -> Path:
        launch = {"executor": "slurm", "time_min": 5, "array_parallelism": 8, **launch}
        if slurm_cluster.partition:
            launch.setdefault("partition", slurm_cluster.partition)
        spec = {
            "name": "tiny",
            "data": {"corpus": str(corpus), "seq_len": 32, "val_tokens": 1024},
            "model": {"family": "gpt", "aspect_ratio": 16, "head_dim": 8},
            "train": {"batch_tokens": 256, "lr": 1e-2, "eval_points": 2, "threads": 1}
            | (train or {}),
            "plan": plan,
            "launch": launch,
        }
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return make


SIX_RUNS = {"kind": "grid", "params": [2.0e3, 5.0e3], "tokens": [4.0e3, 8.0e3, 1.6e4]}


def _invoke(*args: str, exit_code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return result.output


def _losses(sweep_dir: Path) -> pd.DataFrame:
    runs = load_runs(sweep_dir).set_index("run_id").sort_index()
    return runs[["status", "loss", "train_loss", "steps"]]


def test_sweep_array_matches_local_and_a_failed_task_is_retried(make_spec, tmp_path: Path) -> None:
    spec = make_spec(SIX_RUNS)
    results, sweep_dir = tmp_path / "results", tmp_path / "results" / "tiny"
    # One task is made to fail: a folder stands where it writes its curve.
    bad = plan_sweep(load_sweep(spec))[2].run.run_id
    (sweep_dir / "curves" / f"{bad}.parquet").mkdir(parents=True)

    # The command stores what it can and exits 1, so that a script notices the failure.
    out = _invoke("run", str(spec), "--results", str(results), "--no-analyze", exit_code=1)
    assert "5 trained" in out and "1 failed" in out, out
    jobs = read_jobs(sweep_dir)
    assert len(jobs) == 6 and len({j["job_id"].split("_")[0] for j in jobs.values()}) == 1

    # The others are stored; the failure is a row with its job, SLURM state and error.
    failed = read_run(sweep_dir, bad)
    assert failed["status"] == "failed" and failed["slurm_state"] == "FAILED"
    assert failed["job_id"] == jobs[bad]["job_id"] and "IsADirectoryError" in failed["error"]
    status = json.loads(_invoke("status", str(sweep_dir), "--json"))
    assert status["summary"] == {"done": 5, "failed": 1}
    assert "IsADirectoryError" in _invoke("status", str(sweep_dir))

    # A rerun with --retry-failed submits only the failed run.
    (sweep_dir / "curves" / f"{bad}.parquet").rmdir()
    others = {p: p.stat().st_mtime_ns for p in (sweep_dir / "runs").glob("*.parquet")}
    others.pop(sweep_dir / "runs" / f"{bad}.parquet")
    out = _invoke("run", str(spec), "--results", str(results), "--no-analyze", "--retry-failed")
    assert "1 trained" in out and "5 already stored" in out, out
    assert others == {p: p.stat().st_mtime_ns for p in others}

    # The same sweep run here, locally, gives the same losses.
    local = tmp_path / "local"
    _invoke("run", str(spec), "--results", str(local), "--executor", "local", "--no-analyze")
    pd.testing.assert_frame_equal(_losses(sweep_dir), _losses(local / "tiny"))


def test_two_commands_at_once_submit_each_run_once(make_spec, tmp_path: Path) -> None:
    spec = make_spec({"kind": "grid", "params": [2.0e3], "tokens": [4.0e3, 8.0e3]}, preflight=False)
    command = [str(Path(sys.executable).parent / "scaling"), "run", str(spec), "--no-analyze"]
    command += ["--results", str(tmp_path / "results")]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs

    # One command submitted both runs, the other found them held by a live job.
    assert sorted("2 being trained elsewhere" in o for o in outs) == [False, True], outs
    assert any("2 trained" in o for o in outs), outs
    runs = load_runs(tmp_path / "results" / "tiny")
    assert len(runs) == 2 and set(runs["status"]) == {"done"}


def _wait(what: str, check, timeout: float, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.parametrize(
    "interrupt",
    [
        ["scancel", "--signal=USR2"],  # as before a time limit: submitit's checkpoint()
        ["scontrol", "requeue"],  # from outside: SIGTERM, the task restarts from its pickle
    ],
    ids=["usr2", "scontrol-requeue"],
)
def test_requeued_run_resumes_from_its_checkpoint(
    make_spec, tmp_path: Path, interrupt: list[str]
) -> None:
    spec = make_spec({"kind": "grid", "params": [5.0e3], "tokens": [2.0e5]}, preflight=False)
    sweep = load_sweep(spec)
    run = plan_sweep(sweep)[0].run
    outcome = run_sweep(sweep, tmp_path / "results", wait=False, show_progress=False)
    sweep_dir = outcome.sweep_dir
    job_id = read_jobs(sweep_dir)[run.run_id]["job_id"]

    # Once it trains, interrupt it.
    progress = sweep_dir / "progress" / f"{run.run_id}.json"
    _wait("the run to start", progress.exists, timeout=60, every=0.2)
    subprocess.run([*interrupt, job_id], check=True)

    def state() -> str:
        return sweep_status(sweep_dir).set_index("run_id").loc[run.run_id, "state"]

    _wait("the run to wait as preempted", lambda: state() == "preempted", timeout=30)
    assert (sweep_dir / "checkpoints" / f"{run.run_id}.pt").exists()
    row = _wait("the run to be stored", lambda: read_run(sweep_dir, run.run_id), timeout=120)

    log = Path(read_jobs(sweep_dir)[run.run_id]["log"]).read_text()
    assert "resuming at step" in log, log[-2000:]
    uninterrupted = train_run(run, tmp_path / "uninterrupted")
    assert row["status"] == "done" and row["loss"] == uninterrupted["loss"]
    assert row["train_loss"] == uninterrupted["train_loss"]


def test_ddp_run_on_two_tasks(make_spec, tmp_path: Path) -> None:
    spec = make_spec(
        {"kind": "grid", "params": [5.0e3], "tokens": [8.0e3]},
        tasks_per_node=2,
        preflight=False,
    )
    sweep = load_sweep(spec)
    run = plan_sweep(sweep)[0].run
    outcome = run_sweep(sweep, tmp_path / "results", show_progress=False)
    assert outcome.trained == [run.run_id]

    row = read_run(outcome.sweep_dir, run.run_id)
    single = train_run(run, tmp_path / "single")
    assert row["loss"] == pytest.approx(single["loss"], rel=1e-5)
    log = Path(read_jobs(outcome.sweep_dir)[run.run_id]["log"]).read_text()
    assert "rank 0 of 2 (gloo)" in log


def _queued() -> set[str]:
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    return set(queue.stdout.split())


def test_bad_launch_settings_fail_at_submission(
    make_spec, tmp_path: Path, slurm_cluster: SlurmCluster
) -> None:
    results = tmp_path / "results"
    one = {"kind": "grid", "params": [2.0e3], "tokens": [4.0e3]}
    cases = [
        ({"cpus_per_task": slurm_cluster.max_cpus_per_node + 1}, "CPUs per node, but the nodes"),
        ({"partition": "no-such-partition"}, "no such partition; valid:"),
        # Past our checks, sbatch itself refuses: its reason comes back, nothing waits.
        ({"sbatch": {"mem-per-cpu": 10**9}}, r"(?s)sbatch refused the job: .*not available"),
    ]
    before = _queued()
    for launch, message in cases:
        sweep = load_sweep(make_spec(one, **launch))
        with pytest.raises(LaunchError, match=message):
            run_sweep(sweep, results, show_progress=False)
    assert not read_jobs(results / "tiny")
    assert _queued() <= before, "no job was left in the queue"


def test_preflight_refuses_other_versions_on_the_nodes(make_spec, tmp_path: Path) -> None:
    launch = load_sweep(make_spec(SIX_RUNS)).launch
    executor = make_executor(launch, tmp_path / "jobs", "scaling-preflight")
    preflight(executor)  # the same interpreter on the node: passes

    here = {"python": ".".join(map(str, sys.version_info[:3])), "torch": "0.0.1"}
    with pytest.raises(LaunchError, match=r"torch: 0\.0\.1 here, \d[\d.+a-z]* on the node"):
        preflight(executor, expected=here)
    assert os.environ.get("SCALING_CACHE_DIR")

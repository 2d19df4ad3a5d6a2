"""Where every run of a sweep stands: from the store, the run locks, progress files,
checkpoints and, for runs submitted to SLURM, the scheduler."""

from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path

import pandas as pd

from scaling.errors import ResultsError
from scaling.results import load_runs

log = logging.getLogger(__name__)

COLUMNS = [
    "run_id",
    "state",
    "params",
    "tokens",
    "tokens_done",
    "progress",
    "loss",
    "job_id",
    "slurm_state",
    "error",
]
STATES = ("done", "diverged", "failed", "running", "preempted", "pending")


def progress_path(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "progress" / f"{run_id}.json"


def write_progress(sweep_dir: Path, run_id: str, step: int, steps: int, tokens: int) -> None:
    """Record how far a running run is (read by `scaling status`)."""
    path = progress_path(sweep_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "steps": steps, "tokens": tokens}))
    tmp.replace(path)


def read_progress(sweep_dir: Path, run_id: str) -> dict | None:
    try:
        return json.loads(progress_path(sweep_dir, run_id).read_text())
    except (OSError, ValueError):
        return None


def run_locked(sweep_dir: Path, run_id: str) -> bool:
    """Whether some process holds the run's lock file (it is training the run)."""
    path = Path(sweep_dir) / "locks" / f"{run_id}.lock"
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _planned(sweep_dir: Path) -> list[dict]:
    from scaling.plan import plan_sweep
    from scaling.spec import parse_sweep

    path = sweep_dir / "sweep.json"
    if not path.exists():
        return []
    spec = parse_sweep(json.loads(path.read_text()), str(path))
    return [
        {"run_id": p.run.run_id, "params": p.counts.params, "tokens": p.run.tokens}
        for p in plan_sweep(spec)
    ]


def _has_checkpoint(sweep_dir: Path, run_id: str) -> bool:
    # The trainer's checkpoint file (scaling.checkpoint.checkpoint_path, not imported here
    # because it imports torch).
    return (sweep_dir / "checkpoints" / f"{run_id}.pt").exists()


def _scheduler_states(jobs: dict[str, dict], run_ids: list[str]) -> dict[str, str]:
    """SLURM state of the latest job of each of ``run_ids`` that has one."""
    from scaling.errors import LaunchError
    from scaling.slurm import job_states

    asked = [jobs[r]["job_id"] for r in run_ids if r in jobs]
    if not asked:
        return {}
    try:
        return job_states(asked)
    except LaunchError as exc:
        log.warning("SLURM states unknown: %s", exc)
        return {}


def _unfinished_state(sweep_dir: Path, run_id: str, slurm_state: str | None) -> str | None:
    """State of a run that is not stored as finished, or None to keep the stored one."""
    from scaling.slurm import FAILED_STATES, INTERRUPTED_STATES, LIVE_STATES, RUNNING_STATES

    if run_locked(sweep_dir, run_id) or slurm_state in RUNNING_STATES:
        return "running"
    interrupted = _has_checkpoint(sweep_dir, run_id)
    if slurm_state in LIVE_STATES:  # queued, or requeued and waiting to resume
        return "preempted" if interrupted else "pending"
    if slurm_state in INTERRUPTED_STATES or interrupted:
        return "preempted"
    if slurm_state in FAILED_STATES:
        return "failed"
    return None


def sweep_status(sweep_dir: Path | str, *, scheduler: bool = True) -> pd.DataFrame:
    """One row per run (planned or stored): state, size, tokens done, last loss, job, error.

    States: ``pending`` (not started, or queued), ``running``, ``done``, ``diverged``,
    ``failed``, ``preempted`` (stopped with a checkpoint: waiting in the queue to resume,
    or to be submitted again). For runs submitted to SLURM (``jobs.json``) the scheduler
    is asked for their jobs' states, unless ``scheduler`` is False.
    """
    from scaling.slurm import read_jobs

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ResultsError(f"{sweep_dir}: no such sweep folder")
    stored = load_runs(sweep_dir) if (sweep_dir / "runs").is_dir() else pd.DataFrame()
    planned = _planned(sweep_dir)
    if not planned and stored.empty:
        raise ResultsError(f"{sweep_dir}: neither a sweep.json nor stored runs here")

    rows: dict[str, dict] = {p["run_id"]: {**p, "state": "pending"} for p in planned}
    for rec in stored.to_dict(orient="records") if not stored.empty else []:
        row = rows.setdefault(rec["run_id"], {"run_id": rec["run_id"]})
        row.update(
            state=rec["status"],
            params=rec["params"],
            tokens=rec["tokens"],
            tokens_done=rec["tokens"] if rec["status"] == "done" else None,
            loss=rec["loss"],
            job_id=rec["job_id"],
            slurm_state=rec["slurm_state"],
            error=rec["error"],
        )

    # Runs not stored as finished: ask the locks, the checkpoints and the scheduler.
    jobs = read_jobs(sweep_dir)
    open_ids = [r for r, row in rows.items() if row["state"] in ("pending", "failed")]
    states = _scheduler_states(jobs, open_ids) if scheduler else {}
    for run_id, row in rows.items():
        if run_id in jobs:
            row["job_id"] = jobs[run_id]["job_id"]
        if run_id not in open_ids:
            continue
        slurm_state = states.get(jobs.get(run_id, {}).get("job_id", ""))
        if slurm_state is not None:
            row["slurm_state"] = slurm_state
        state = _unfinished_state(sweep_dir, run_id, slurm_state)
        if state is not None and not (row["state"] == "failed" and state == "preempted"):
            row["state"] = state
        if row["state"] == "failed" and not row.get("error") and slurm_state:
            row["error"] = f"SLURM job {row['job_id']} ended {slurm_state} (see its log)"
        if row["state"] in ("pending", "running", "preempted"):
            progress = read_progress(sweep_dir, run_id)
            if progress is not None:
                row["tokens_done"] = progress["tokens"]

    table = pd.DataFrame(list(rows.values()))
    for name in COLUMNS:
        if name not in table.columns:
            table[name] = None
    table["progress"] = [
        f"{100 * d / t:.0f}%" if pd.notna(d) and pd.notna(t) and t else ""
        for d, t in zip(table["tokens_done"], table["tokens"], strict=True)
    ]
    return table[COLUMNS]


def summary_line(table: pd.DataFrame) -> str:
    """``6 runs: 4 done, 1 failed, 1 running; 3,072 of 4,096 tokens (75%)``."""
    counts = table["state"].value_counts()
    states = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
    done = pd.to_numeric(table["tokens_done"], errors="coerce").fillna(0).sum()
    total = pd.to_numeric(table["tokens"], errors="coerce").fillna(0).sum()
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{len(table)} runs: {states}; {int(done):,} of {int(total):,} tokens{share}"

"""Where every run of a sweep stands, from the store, the run locks and progress files."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pandas as pd

from scaling.errors import ResultsError
from scaling.results import load_runs

COLUMNS = [
    "run_id",
    "state",
    "params",
    "tokens",
    "tokens_done",
    "progress",
    "loss",
    "job_id",
    "error",
]


def progress_path(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "progress" / f"{run_id}.json"


def write_progress(sweep_dir: Path, run_id: str, step: int, steps: int, tokens: int) -> None:
    """Record how far a running run is (read by `scaling status`)."""
    path = progress_path(sweep_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "steps": steps, "tokens": tokens}))
    tmp.replace(path)


def _read_progress(sweep_dir: Path, run_id: str) -> dict | None:
    try:
        return json.loads(progress_path(sweep_dir, run_id).read_text())
    except (OSError, ValueError):
        return None


def _locked(sweep_dir: Path, run_id: str) -> bool:
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


def sweep_status(sweep_dir: Path | str) -> pd.DataFrame:
    """One row per run (planned or stored): state, size, tokens done, last loss, error."""
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
            error=rec["error"],
        )
    for run_id, row in rows.items():
        if row["state"] in ("pending", "failed") and _locked(sweep_dir, run_id):
            row["state"] = "running"
        if row["state"] in ("pending", "running"):
            progress = _read_progress(sweep_dir, run_id)
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

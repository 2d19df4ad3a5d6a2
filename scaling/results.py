"""The Parquet results store.

Layout of one sweep folder::

    results/NAME/runs/RUN_ID.parquet     one row: the run's sizes, counts, losses, status
    results/NAME/curves/RUN_ID.parquet   one row per logged step

Each table has one declared Arrow schema and every write casts to it, so the files read the
same in pyarrow, pandas, polars or DuckDB. Files are written under a temporary name in the
same folder and renamed into place, so a kill never leaves a half-written file under the
final name. A reader that meets a file it cannot read renames it to ``*.parquet.unreadable``
(so the run counts as missing and is trained again) and warns, naming it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from scaling.errors import ResultsError

log = logging.getLogger(__name__)

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("sweep", pa.string()),
        ("status", pa.string()),  # done | failed | diverged
        ("error", pa.string()),
        ("family", pa.string()),
        ("n_layers", pa.int64()),
        ("d_model", pa.int64()),
        ("n_heads", pa.int64()),
        ("d_ff", pa.int64()),
        ("seq_len", pa.int64()),
        ("vocab_size", pa.int64()),
        ("tie_embeddings", pa.bool_()),
        ("num_experts", pa.int64()),
        ("top_k", pa.int64()),
        ("params", pa.int64()),
        ("params_nonembedding", pa.int64()),
        ("params_active", pa.int64()),
        ("params_embedding", pa.int64()),
        ("flops_per_token", pa.float64()),
        ("flops_6n", pa.float64()),
        ("flops_kaplan", pa.float64()),
        ("flops_convention", pa.string()),
        ("tokens", pa.int64()),
        ("steps", pa.int64()),
        ("batch_tokens", pa.int64()),
        ("compute", pa.float64()),  # tokens x FLOPs per token under flops_convention
        ("compute_6n", pa.float64()),
        ("compute_shape", pa.float64()),
        ("compute_kaplan", pa.float64()),
        ("target_params", pa.float64()),
        ("target_compute", pa.float64()),
        ("loss", pa.float64()),  # final validation loss: what fits use
        ("val_loss", pa.float64()),
        ("train_loss", pa.float64()),
        ("lr", pa.float64()),
        ("schedule", pa.string()),
        ("seed", pa.int64()),
        ("corpus", pa.string()),
        ("corpus_id", pa.string()),  # SHA-256 of the corpus token file
        ("corpus_tokens", pa.int64()),
        ("wall_seconds", pa.float64()),
        ("tokens_per_second", pa.float64()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("host", pa.string()),
        ("scaling_version", pa.string()),
        ("torch_version", pa.string()),
        ("python_version", pa.string()),
        ("branched_from", pa.string()),  # WSD cooldown branches: the run they left
        ("job_id", pa.string()),
        ("slurm_state", pa.string()),
        ("spec", pa.string()),  # the resolved RunSpec as JSON
    ]
)

CURVES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("tokens", pa.int64()),
        ("compute", pa.float64()),
        ("train_loss", pa.float64()),
        ("val_loss", pa.float64()),  # null except at evaluation steps
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens_per_second", pa.float64()),
        ("aux_loss", pa.float64()),  # MoE load-balancing loss (null for dense)
        ("z_loss", pa.float64()),
        ("dropped_fraction", pa.float64()),
    ]
)


def _table(rows: pd.DataFrame | list[dict], schema: pa.Schema, what: str) -> pa.Table:
    frame = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    unknown = set(frame.columns) - set(schema.names)
    if unknown:
        raise ResultsError(f"{what}: columns not in the schema: {sorted(unknown)}")
    for name in schema.names:
        if name not in frame.columns:
            frame[name] = None
    frame = frame[schema.names]
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_path(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "runs" / f"{run_id}.parquet"


def curve_path(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "curves" / f"{run_id}.parquet"


def write_run(sweep_dir: Path, row: dict) -> Path:
    """Store one run's row (cast to ``RUNS_SCHEMA``)."""
    path = run_path(sweep_dir, row["run_id"])
    write_atomic(_table([row], RUNS_SCHEMA, str(path)), path)
    return path


def write_curve(sweep_dir: Path, run_id: str, rows: pd.DataFrame | list[dict]) -> Path:
    """Store one run's curve (cast to ``CURVES_SCHEMA``), replacing any earlier one."""
    path = curve_path(sweep_dir, run_id)
    frame = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows.copy()
    frame["run_id"] = run_id
    write_atomic(_table(frame, CURVES_SCHEMA, str(path)), path)
    return path


def _read(path: Path, schema: pa.Schema) -> pd.DataFrame | None:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside the same way
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        warnings.warn(
            f"{path}: cannot be read ({type(exc).__name__}: {exc}); set aside as {aside.name}, "
            "so that run counts as missing",
            stacklevel=3,
        )
        return None
    missing = [n for n in schema.names if n not in table.column_names]
    for name in missing:
        table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
    return table.select(schema.names).cast(schema).to_pandas()


def _sweep_dirs(source: Path | str | Iterable[Path | str]) -> list[Path]:
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    dirs = []
    for item in sources:
        item = Path(item)
        if not item.is_dir():
            raise ResultsError(f"{item}: not a results folder (no such directory)")
        if (item / "runs").is_dir():
            dirs.append(item)
        else:
            children = sorted(p for p in item.iterdir() if (p / "runs").is_dir())
            if not children:
                raise ResultsError(f"{item}: no runs/ folder here or in its subfolders")
            dirs.extend(children)
    return dirs


def load_runs(source: Path | str | Iterable[Path | str]) -> pd.DataFrame:
    """Every stored run of one sweep folder, of a results root, or of several: one row each."""
    frames = []
    for sweep_dir in _sweep_dirs(source):
        for path in sorted((sweep_dir / "runs").glob("*.parquet")):
            frame = _read(path, RUNS_SCHEMA)
            if frame is not None:
                frames.append(frame)
    if not frames:
        return RUNS_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def load_curves(
    source: Path | str | Iterable[Path | str], run_ids: Iterable[str] | None = None
) -> pd.DataFrame:
    """Training curves of the runs in ``source`` (all, or those in ``run_ids``)."""
    wanted = set(run_ids) if run_ids is not None else None
    frames = []
    for sweep_dir in _sweep_dirs(source):
        for path in sorted((sweep_dir / "curves").glob("*.parquet")):
            if wanted is not None and path.stem not in wanted:
                continue
            frame = _read(path, CURVES_SCHEMA)
            if frame is not None:
                frames.append(frame)
    if not frames:
        return CURVES_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def read_run(sweep_dir: Path, run_id: str) -> dict | None:
    """The stored row of one run, or None when it is not stored (or was unreadable)."""
    path = run_path(sweep_dir, run_id)
    if not path.exists():
        return None
    frame = _read(path, RUNS_SCHEMA)
    return None if frame is None or frame.empty else frame.iloc[0].to_dict()

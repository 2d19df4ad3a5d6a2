"""Loading the tables that fits read: a CSV or Parquet file, or a results folder.

A fit table has one row per run and the columns ``params`` (N), ``tokens`` (D), ``compute``
(C) and ``loss``; a missing ``tokens`` column is derived as C / (k·N) and a missing
``compute`` column as k·N·D, with k the FLOP convention factor (6 by default).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.errors import ResultsError

logger = logging.getLogger(__name__)

#: Columns a fit needs once ``tokens`` and ``compute`` have been derived where missing.
REQUIRED = ("params", "tokens", "compute", "loss")

#: Columns that must hold positive, finite numbers wherever present.
POSITIVE = ("params", "tokens", "compute", "loss", "unique_tokens")

#: FLOPs per parameter per token for training (forward plus backward), Kaplan et al. 2020,
#: section 2.1: C ≈ 6·N·D for dense transformers when the sequence is short against d_model.
DEFAULT_FLOPS_PER_PARAM_TOKEN = 6.0


def parse_columns(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """Parse ``--col`` items of the form ``params=NAME`` into a mapping.

    Parameters
    ----------
    items
        Strings ``FIELD=COLUMN`` where FIELD is one of the fit's column names.

    Returns
    -------
    dict[str, str]
        Field name to column name in the user's table.
    """
    known = (*REQUIRED, "unique_tokens", "run_id", "status", "sweep", "budget")
    mapping: dict[str, str] = {}
    for item in items or ():
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise ResultsError(f"--col {item!r}: expected FIELD=COLUMN, e.g. params='Model Size'")
        if field not in known:
            raise ResultsError(
                f"--col {item!r}: unknown field {field!r}; valid: {', '.join(known)}"
            )
        mapping[field] = column
    return mapping


def _read(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, naming the file in any error."""
    if not path.exists():
        raise ResultsError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as exc:  # pandas and pyarrow raise many types; name the file either way
        raise ResultsError(f"{path}: cannot read table: {exc}") from exc
    raise ResultsError(f"{path}: unknown table type {suffix!r}; use .csv, .tsv or .parquet")


def _bad_rows(frame: pd.DataFrame, column: str) -> list[int]:
    """Row positions where ``column`` is NaN, infinite, zero or negative."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values <= 0)
    return [int(i) for i in np.flatnonzero(bad)]


def check_table(
    frame: pd.DataFrame,
    source: str,
    flops_per_param_token: float = DEFAULT_FLOPS_PER_PARAM_TOKEN,
) -> pd.DataFrame:
    """Derive missing ``tokens``/``compute`` columns and check the values of a fit table.

    Parameters
    ----------
    frame
        Table with fit column names already applied.
    source
        Where the table came from, named in errors.
    flops_per_param_token
        FLOP convention factor k in C = k·N·D.

    Returns
    -------
    pandas.DataFrame
        A copy with float columns ``params``, ``tokens``, ``compute``, ``loss``.

    Raises
    ------
    ResultsError
        A required column is missing, or holds zeros, negatives or NaN.
    """
    frame = frame.copy()
    present = ", ".join(map(str, frame.columns))
    for column in ("params", "loss"):
        if column not in frame.columns:
            raise ResultsError(
                f"{source}: missing column {column!r} (columns present: {present}); "
                f"map one with --col {column}=NAME"
            )
    if "tokens" not in frame.columns and "compute" not in frame.columns:
        raise ResultsError(
            f"{source}: missing columns 'tokens' and 'compute' (need one of them; columns "
            f"present: {present}); map one with --col tokens=NAME or --col compute=NAME"
        )

    # Check the given columns before deriving, so that errors name the user's own column.
    for column in POSITIVE:
        if column not in frame.columns:
            continue
        bad = _bad_rows(frame, column)
        if bad:
            shown = ", ".join(f"row {i + 2} ({frame[column].iloc[i]!r})" for i in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ResultsError(
                f"{source}: column {column!r} must hold positive finite numbers; "
                f"zero, negative or NaN at {shown}{more} (row numbers count the header as 1)"
            )
        frame[column] = pd.to_numeric(frame[column]).astype(float)

    k = flops_per_param_token
    if "tokens" not in frame.columns:
        frame["tokens"] = frame["compute"] / (k * frame["params"])
        logger.info("%s: derived tokens as compute / (%g * params)", source, k)
    if "compute" not in frame.columns:
        frame["compute"] = k * frame["params"] * frame["tokens"]
        logger.info("%s: derived compute as %g * params * tokens", source, k)
    return frame


def load_table(
    path: str | Path,
    columns: dict[str, str] | None = None,
    flops_per_param_token: float = DEFAULT_FLOPS_PER_PARAM_TOKEN,
) -> pd.DataFrame:
    """Load a CSV or Parquet table of runs for fitting.

    Parameters
    ----------
    path
        A ``.csv``, ``.tsv`` or ``.parquet`` file.
    columns
        Mapping from fit field (``params``, ``tokens``, ``compute``, ``loss``, ...) to the
        column name in the file, e.g. ``{"params": "Model Size"}``.
    flops_per_param_token
        FLOP convention factor k used to derive tokens = C/(kN) or compute = kND.

    Returns
    -------
    pandas.DataFrame
        The table with fit column names, derived columns added, values checked.

    Raises
    ------
    ResultsError
        The file cannot be read, a mapped or required column is missing, or a value is
        zero, negative or NaN.
    """
    path = Path(path)
    frame = _read(path)
    present = ", ".join(map(str, frame.columns))
    rename: dict[str, str] = {}
    for field, column in (columns or {}).items():
        if column not in frame.columns:
            raise ResultsError(
                f"{path}: column {column!r} (mapped to {field}) not found; "
                f"columns present: {present}"
            )
        rename[column] = field
    # A mapped column replaces any column already carrying the field's name.
    clashing = [f for c, f in rename.items() if f in frame.columns and c != f]
    frame = frame.drop(columns=clashing).rename(columns=rename)
    return check_table(frame, str(path), flops_per_param_token)


def load_source(
    source: str | Path,
    columns: dict[str, str] | None = None,
    flops_per_param_token: float = DEFAULT_FLOPS_PER_PARAM_TOKEN,
) -> pd.DataFrame:
    """Load runs from a results folder or from a table file.

    Parameters
    ----------
    source
        A results directory (read with ``scaling.results.load_runs``) or a table file.
    columns
        Column mapping for a table file (see `load_table`).
    flops_per_param_token
        FLOP convention factor k.

    Returns
    -------
    pandas.DataFrame
        One row per run with at least ``params``, ``tokens``, ``compute``, ``loss``.
    """
    source = Path(source)
    if not source.is_dir():
        return load_table(source, columns, flops_per_param_token)

    # Imported here: the results store pulls in pyarrow and is not needed for tables.
    from scaling.results import load_runs

    runs = load_runs(source)
    if not columns and "family" in runs.columns and set(runs["family"].dropna()) == {"moe"}:
        # An MoE sweep is fitted on active parameters, what its compute counts.
        logger.info("%s: MoE runs, N = params_active", source)
        columns = {"params": "params_active"}
    if columns:
        # e.g. --col params=params_active for an MoE sweep: the mapped column replaces the
        # store's own column of that name.
        replaced = [k for k, v in columns.items() if k != v and k in runs.columns]
        runs = runs.drop(columns=replaced).rename(columns={v: k for k, v in columns.items()})
    if "status" in runs.columns:
        # Failed and diverged runs have no usable loss; drop them before the value check.
        runs = done_runs(runs, str(source))
    return check_table(runs, str(source), flops_per_param_token)


def done_runs(frame: pd.DataFrame, source: str = "table") -> pd.DataFrame:
    """Keep rows whose ``status`` is "done", warning with the run ids of the others.

    Parameters
    ----------
    frame
        Runs table, with or without a ``status`` column.
    source
        Named in the warning.

    Returns
    -------
    pandas.DataFrame
        The rows with status "done" (all rows when there is no status column).
    """
    if "status" not in frame.columns:
        return frame
    keep = frame["status"].astype(str).eq("done")
    if not keep.all():
        ids = frame["run_id"] if "run_id" in frame.columns else frame.index
        dropped = [f"{i} ({s})" for i, s in zip(ids[~keep], frame["status"][~keep], strict=True)]
        message = f"{source}: left out {len(dropped)} runs not done: {', '.join(dropped)}"
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    return frame[keep]

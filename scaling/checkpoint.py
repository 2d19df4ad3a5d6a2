"""Training checkpoints: one file per run, written atomically, removed when the run is stored.

``SWEEP_DIR/checkpoints/RUN_ID.pt`` holds everything a run needs to go on exactly where it
stopped: model and optimiser state, the number of steps done (which is also the data
position, since batches are a function of the step), the torch RNG state, the curve rows so
far and the partial sums of the current logging interval. The trainer writes it every
``train.checkpoint_interval`` steps and when it is asked to stop (SIGTERM, SIGUSR2).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1


def checkpoint_path(sweep_dir: Path, run_id: str) -> Path:
    """Where the checkpoint of ``run_id`` lives."""
    return Path(sweep_dir) / "checkpoints" / f"{run_id}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file, an fsync and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, run_id: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is a usable one for ``run_id``, else None.

    A file that cannot be read, or that belongs to another run or format, is set aside as
    ``*.pt.unusable`` with a warning, and the run starts from the beginning.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = None
        if state.get("format") != FORMAT:
            problem = f"format {state.get('format')!r}, expected {FORMAT}"
        elif state.get("run_id") != run_id:
            problem = f"it belongs to run {state.get('run_id')!r}"
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return state
    aside = path.with_name(path.name + ".unusable")
    os.replace(path, aside)
    warnings.warn(
        f"{path}: cannot resume from it ({problem}); set aside as {aside.name}, "
        "the run starts from the beginning",
        stacklevel=2,
    )
    return None


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint of a finished run (and nothing else)."""
    path.unlink(missing_ok=True)

"""Warm-up-stable-decay branching: one long run per model size yields several token counts.

Under ``schedule: wsd`` the learning rate stays at its peak until the last
``cooldown_fraction`` of a run's steps, so the stable phase of a short run is the start of
a longer run of the same model. A grid over D therefore needs one long *trunk* per model
size, trained in the stable phase; each D branches off it into its own short linear
cooldown (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations", section 3: cooldowns of 10-20% match cosine runs of the same length).

How it is laid out:

- The planner (``scaling.plan``) makes one ``RunSpec`` per branch: its own ``steps`` (D),
  and ``branches``, the steps of every branch of its trunk. A branch of ``S`` steps leaves
  the trunk at ``branch_point(S) = S - round(cooldown_fraction * S)`` and decays linearly
  to ``min_lr_ratio * lr`` over the rest, exactly as a standalone ``wsd`` run of ``S``
  steps does. The trunk warms up as the longest branch does, so the longest branch is
  step for step the standalone run of its D; the shorter ones differ from theirs only in
  the length of the warm-up (a share of the trunk's steps rather than of their own).
- Each branch is stored as its own row, with its own ``run_id`` and ``branched_from`` (the
  trunk's id, ``trunk_id``), and its curve holds the trunk rows up to its branch point,
  then its cooldown. Evaluations and curve rows of the trunk part are placed the same way
  for every branch (``eval_points``), so branches of one trunk share that prefix exactly.
- The trainer (``scaling.train``) starts a branch from the newest trunk checkpoint at or
  before its branch point (``checkpoints/TRUNK_ID-stepB.pt``), trains the trunk on to its
  branch point, leaving a checkpoint at every branch point it passes for the longer
  branches, and then cools down. Trained shortest first (the planner's order), a grid over
  D costs one trunk plus the cooldowns. Trunk checkpoints that no unfinished branch needs
  are removed when a branch is stored.

NOTE: branches of one trunk that run at the same time (a worker pool, a SLURM array) each
train the trunk part that no checkpoint covers yet; the results are the same, the work is
repeated. Run a branched sweep with one local worker per model size to avoid it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from scaling.checkpoint import checkpoint_path
from scaling.errors import SpecError
from scaling.results import read_run
from scaling.spec import RunSpec, TrainSpec

log = logging.getLogger(__name__)


def cooldown_steps(steps: int, train: TrainSpec) -> int:
    """Steps of the final linear decay of a ``wsd`` run of ``steps`` steps."""
    return max(1, int(round(train.cooldown_fraction * steps)))


def warmup_steps(steps: int, train: TrainSpec) -> int:
    """Steps of the linear warm-up of a run of ``steps`` steps."""
    return int(round(train.warmup_fraction * steps))


def branch_point(steps: int, train: TrainSpec) -> int:
    """Trunk steps before a branch of ``steps`` steps starts its cooldown."""
    return steps - cooldown_steps(steps, train)


def trunk_steps(run: RunSpec) -> int:
    """Steps of the longest branch: the trunk follows that run's warm-up."""
    return max(run.branches)


def branch_points(run: RunSpec) -> list[int]:
    """Branch points of every branch of ``run``'s trunk, ascending."""
    return sorted({branch_point(s, run.train) for s in run.branches})


def sibling(run: RunSpec, steps: int) -> RunSpec:
    """The branch of ``run``'s trunk that trains ``steps`` steps."""
    return run.model_copy(update={"steps": steps, "tokens": steps * run.train.batch_tokens})


def trunk_id(run: RunSpec) -> str:
    """A stable id of the trunk of branch ``run`` (the same for all its branches)."""
    longest = sibling(run, trunk_steps(run))
    return hashlib.sha256(f"wsd-trunk:{longest.run_id}".encode()).hexdigest()[:16]


def check_branches(steps: list[int], train: TrainSpec, field: str = "plan.tokens") -> None:
    """Refuse branches whose cooldown would start inside the trunk's warm-up."""
    warmup = warmup_steps(max(steps), train)
    shortest = min(steps)
    if branch_point(shortest, train) < warmup:
        raise SpecError(
            f"{field}: the shortest branch ({shortest} steps) would start its cooldown at "
            f"step {branch_point(shortest, train)}, inside the trunk's warm-up of {warmup} "
            "steps (train.warmup_fraction of the longest run); raise the smallest token count "
            "or lower train.warmup_fraction"
        )


def eval_points(run: RunSpec, trunk_evals: list[int]) -> set[int]:
    """Evaluation steps of branch ``run``.

    ``trunk_evals`` are the trunk's log-spaced points (over the longest branch); those up to
    this branch's point, every branch point up to it (so a branch's starting loss is in
    every longer branch's curve too) and the branch's last step.
    """
    point = branch_point(run.steps, run.train)
    shared = {s for s in trunk_evals if s <= point} | {b for b in branch_points(run) if b <= point}
    return {s for s in shared if s > 0} | {run.steps}


def trunk_checkpoint_id(run: RunSpec, point: int) -> str:
    """The id (and file stem) of the trunk checkpoint at ``point`` steps."""
    return f"{trunk_id(run)}-step{point}"


def trunk_checkpoint(sweep_dir: Path, run: RunSpec, point: int) -> Path:
    """Where the trunk checkpoint of ``run`` at ``point`` steps lives."""
    return checkpoint_path(sweep_dir, trunk_checkpoint_id(run, point))


def trunk_start(sweep_dir: Path, run: RunSpec) -> tuple[Path, str] | None:
    """The newest trunk checkpoint at or before ``run``'s branch point, with its id."""
    point = branch_point(run.steps, run.train)
    for b in reversed(branch_points(run)):
        path = trunk_checkpoint(sweep_dir, run, b)
        if 0 < b <= point and path.exists():
            return path, trunk_checkpoint_id(run, b)
    return None


def trunk_saves(run: RunSpec) -> set[int]:
    """Steps at which training ``run`` leaves a trunk checkpoint: every branch point it
    passes that a longer branch starts from."""
    point = branch_point(run.steps, run.train)
    last = branch_points(run)[-1]
    return {b for b in branch_points(run) if 0 < b <= point and b < last}


def remove_unneeded(sweep_dir: Path, run: RunSpec) -> None:
    """Delete the trunk checkpoints of ``run``'s trunk that no unfinished branch starts
    from (for each unfinished branch only the newest one at or before its point counts)."""
    existing = [b for b in branch_points(run) if trunk_checkpoint(sweep_dir, run, b).exists()]
    needed: set[int] = set()
    for steps in run.branches:
        other = sibling(run, steps)
        stored = read_run(sweep_dir, other.run_id)
        if stored is not None and stored["status"] in ("done", "diverged"):
            continue
        usable = [b for b in existing if b <= branch_point(steps, run.train)]
        if usable:
            needed.add(max(usable))
    for b in existing:
        if b not in needed:
            trunk_checkpoint(sweep_dir, run, b).unlink(missing_ok=True)
            log.debug("trunk %s: removed the checkpoint at step %d", trunk_id(run), b)

"""Planners: turn a sweep spec into resolved runs (shape, N, D, C), without running them.

``grid`` crosses sizes with token counts (with ``schedule: wsd`` the token counts of one size
are cooldown branches of one long run: see ``scaling.wsd``); ``isoflop`` gives each compute
budget several sizes and the tokens that keep it on budget; ``ratio`` fixes tokens per
parameter. Every planner sizes models with ``scaling.model.count.shape_for_params`` and
recomputes D from the achieved N, so the realised compute stays on budget up to one batch of
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaling import wsd
from scaling.errors import SpecError
from scaling.model.count import Counts, ModelShape, count, shape_for_params
from scaling.spec import GridPlan, IsoflopPlan, RatioPlan, RunSpec, SweepSpec

# Sustained training throughput assumed by `scaling plan` for its time estimate, in FLOP/s
# (counted-shape FLOPs per second of wall time). Measured with the trainer on 2 cores of the
# project's CI machine (x86-64, fp32) at d_model 64..192, seq_len 128: see README, "Speed".
ASSUMED_FLOPS_PER_SECOND = 2.0e10

BYTE_VOCAB = 256
# A budget whose IsoFLOP profile would train a model for fewer steps than this is refused:
# such a run ends in its warm-up and says nothing about scaling.
MIN_STEPS = 10


@dataclass(frozen=True)
class PlannedRun:
    """A resolved run with its counts and the estimate `scaling plan` shows."""

    run: RunSpec
    shape: ModelShape
    counts: Counts

    @property
    def compute(self) -> float:
        return self.run.tokens * self.counts.flops(self.run.flops)

    @property
    def trained_tokens(self) -> int:
        """Tokens this run trains itself: all of them, or for a WSD branch trained after its
        shorter siblings, the trunk from the previous branch point on and its cooldown."""
        if not self.run.branches:
            return self.run.tokens
        point = wsd.branch_point(self.run.steps, self.run.train)
        earlier = [b for b in wsd.branch_points(self.run) if b < point]
        return (self.run.steps - max(earlier, default=0)) * self.run.train.batch_tokens

    @property
    def estimated_seconds(self) -> float:
        return self.trained_tokens * self.counts.flops_per_token / ASSUMED_FLOPS_PER_SECOND

    def summary(self) -> dict:
        """One flat row for tables and JSON."""
        return {
            "run_id": self.run.run_id,
            "family": self.shape.family,
            "n_layers": self.shape.n_layers,
            "d_model": self.shape.d_model,
            "n_heads": self.shape.n_heads,
            "params": self.counts.params,
            "params_nonembedding": self.counts.params_nonembedding,
            "params_active": self.counts.params_active,
            "target_params": self.run.target_params,
            "tokens": self.run.tokens,
            "steps": self.run.steps,
            "tokens_per_param": self.run.tokens / self.counts.params_active,
            "target_compute": self.run.target_compute,
            "compute": self.compute,
            "compute_6n": self.run.tokens * self.counts.flops_6n,
            "compute_shape": self.run.tokens * self.counts.flops_per_token,
            "compute_kaplan": self.run.tokens * self.counts.flops_kaplan,
            "branched_from": wsd.trunk_id(self.run) if self.run.branches else None,
            "branch_step": (
                wsd.branch_point(self.run.steps, self.run.train) if self.run.branches else None
            ),
            "estimated_seconds": self.estimated_seconds,
        }


def planned_fields(run: RunSpec) -> dict:
    """The columns of a run's stored row that the plan fixes: shape, counts, tokens, compute.

    The trainer adds the outcome (losses, timings) to these, and a run that fails before it
    ends is stored with these alone, so every row of a sweep can be compared on size.
    """
    shape = ModelShape(**run.shape)
    counts = count(shape)
    return {
        "run_id": run.run_id,
        "sweep": run.sweep,
        "family": shape.family,
        "n_layers": shape.n_layers,
        "d_model": shape.d_model,
        "n_heads": shape.n_heads,
        "d_ff": shape.d_ff,
        "seq_len": shape.seq_len,
        "vocab_size": shape.vocab_size,
        "tie_embeddings": shape.tie_embeddings,
        "num_experts": shape.num_experts,
        "top_k": shape.top_k,
        "params": counts.params,
        "params_nonembedding": counts.params_nonembedding,
        "params_active": counts.params_active,
        "params_embedding": counts.params_embedding,
        "flops_per_token": counts.flops_per_token,
        "flops_6n": counts.flops_6n,
        "flops_kaplan": counts.flops_kaplan,
        "flops_convention": run.flops,
        "tokens": run.tokens,
        "steps": run.steps,
        "batch_tokens": run.train.batch_tokens,
        "compute": run.tokens * counts.flops(run.flops),
        "compute_6n": run.tokens * counts.flops_6n,
        "compute_shape": run.tokens * counts.flops_per_token,
        "compute_kaplan": run.tokens * counts.flops_kaplan,
        "target_params": run.target_params,
        "target_compute": run.target_compute,
        "lr": run.train.lr,
        "schedule": run.train.schedule,
        "seed": run.train.seed,
        "branched_from": wsd.trunk_id(run) if run.branches else None,
        "spec": run.model_dump_json(),
    }


def vocab_size(spec: SweepSpec) -> int:
    """Vocabulary the models of this sweep need (bytes: 256; a token file: its own)."""
    data = spec.data
    if not data.corpus.endswith(".bin"):
        return BYTE_VOCAB
    if data.vocab_size is not None:
        return data.vocab_size
    path = Path(data.corpus)
    if not path.is_file():
        raise SpecError(f"data.corpus: token file {path} not found")
    itemsize = np.dtype(data.token_dtype).itemsize
    if path.stat().st_size % itemsize:
        raise SpecError(
            f"data.corpus: token file {path} has {path.stat().st_size} bytes, not a whole "
            f"number of {data.token_dtype} tokens; is data.token_dtype right?"
        )
    tokens = np.memmap(path, dtype=np.dtype(data.token_dtype), mode="r")
    if tokens.size == 0:
        raise SpecError(f"data.corpus: token file {path} is empty")
    return int(tokens.max()) + 1


class _Sizer:
    """Makes shapes of one sweep from target sizes, remembering the ones already made."""

    def __init__(self, spec: SweepSpec):
        model = spec.model
        self.spec = spec
        self.by = "params_active" if model.family == "moe" else spec.size_by
        self.kwargs: dict = dict(
            vocab_size=vocab_size(spec),
            seq_len=spec.data.seq_len,
            aspect_ratio=model.aspect_ratio,
            head_dim=model.head_dim,
            mlp_ratio=model.mlp_ratio,
            tie_embeddings=model.tie_embeddings,
            family=model.family,
        )
        if model.family == "moe":
            # Fine-grained experts (granularity g): g times as many experts, each 1/g as
            # wide, g times as many chosen, so active parameters stay the same.
            g = model.expert_granularity
            top_k = 1 if model.router == "switch" else model.top_k
            self.kwargs.update(
                num_experts=model.num_experts * g,
                top_k=top_k * g,
                moe_every=model.moe_every,
                expert_granularity=g,
                shared_expert=model.shared_expert,
            )
        self.smallest = shape_for_params(1.0, by=self.by, **self.kwargs)

    def shape(self, target: float) -> ModelShape:
        return shape_for_params(target, by=self.by, **self.kwargs)

    def size(self, counts: Counts) -> int:
        return getattr(counts, self.by)


def _steps(tokens: float, batch_tokens: int) -> int:
    return max(1, int(round(tokens / batch_tokens)))


def _isoflop_targets(plan: IsoflopPlan, budget: float) -> list[float]:
    if plan.params is not None:
        return list(plan.params)
    low_ratio, high_ratio = sorted(plan.tokens_per_param)
    # C = 6 N D and D = r N give N = sqrt(C / (6 r)); the high ratio gives the smallest N.
    n_low = math.sqrt(budget / (6.0 * high_ratio))
    n_high = math.sqrt(budget / (6.0 * low_ratio))
    return list(np.geomspace(n_low, n_high, plan.sizes_per_budget))


def _make(
    spec: SweepSpec,
    shape: ModelShape,
    steps: int,
    target_params: float,
    target_compute: float | None,
    branches: list[int] | None = None,
) -> PlannedRun:
    run = RunSpec(
        sweep=spec.name,
        data=spec.data,
        model=spec.model,
        train=spec.train,
        shape=shape.to_dict(),
        steps=steps,
        tokens=steps * spec.train.batch_tokens,
        target_params=float(target_params),
        target_compute=None if target_compute is None else float(target_compute),
        flops=spec.flops,
        branches=branches or [],
    )
    return PlannedRun(run=run, shape=shape, counts=count(shape))


def _check_train(spec: SweepSpec) -> None:
    train, seq_len = spec.train, spec.data.seq_len
    if train.batch_tokens % seq_len:
        raise SpecError(
            f"train.batch_tokens = {train.batch_tokens}: must be a multiple of data.seq_len "
            f"({seq_len})"
        )
    micro = train.micro_batch_tokens
    if micro is not None and (micro % seq_len or train.batch_tokens % micro):
        raise SpecError(
            f"train.micro_batch_tokens = {micro}: must be a multiple of data.seq_len "
            f"({seq_len}) and divide train.batch_tokens ({train.batch_tokens})"
        )


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    """Resolve every run of ``spec``; raise ``SpecError`` naming the field if one can't be."""
    _check_train(spec)
    sizer = _Sizer(spec)
    plan = spec.plan
    batch = spec.train.batch_tokens
    planned: list[PlannedRun] = []

    if isinstance(plan, GridPlan):
        steps = sorted({_steps(tokens, batch) for tokens in plan.tokens})
        # WSD: the token counts of one size branch off one stable-phase trunk, shortest
        # first, so that each branch picks up the trunk where the previous one left it.
        branched = spec.train.schedule == "wsd" and len(steps) > 1
        if branched:
            wsd.check_branches(steps, spec.train)
        for target in plan.params:
            shape = sizer.shape(target)
            if branched:
                for s in steps:
                    planned.append(_make(spec, shape, s, target, None, branches=steps))
                continue
            for tokens in plan.tokens:
                planned.append(_make(spec, shape, _steps(tokens, batch), target, None))

    elif isinstance(plan, IsoflopPlan):
        for i, budget in enumerate(plan.compute):
            shapes: dict[ModelShape, float] = {}
            for target in _isoflop_targets(plan, budget):
                shapes.setdefault(sizer.shape(target), target)
            for shape, target in shapes.items():
                counts = count(shape)
                steps = int(round(budget / counts.flops(spec.flops) / batch))
                if steps < MIN_STEPS:
                    raise SpecError(
                        f"plan.compute[{i}] = {budget:.3g}: too small for a model of "
                        f"{counts.params:,} parameters (d_model {shape.d_model}): it would "
                        f"train {steps} steps of {batch} tokens, under the minimum of "
                        f"{MIN_STEPS}; raise the budget or lower plan.tokens_per_param"
                    )
                planned.append(_make(spec, shape, steps, target, budget))
            if len(shapes) < 2:
                raise SpecError(
                    f"plan.compute[{i}] = {budget:.3g}: all sizes of this budget round to the "
                    "same model; widen plan.tokens_per_param or lower model.head_dim"
                )

    elif isinstance(plan, RatioPlan):
        if (plan.params is None) == (plan.compute is None):
            raise SpecError("plan: a ratio plan needs exactly one of 'params' or 'compute'")
        for ratio in plan.tokens_per_param:
            if plan.params is not None:
                for target in plan.params:
                    shape = sizer.shape(target)
                    tokens = ratio * sizer.size(count(shape))
                    planned.append(_make(spec, shape, _steps(tokens, batch), target, None))
            else:
                for budget in plan.compute:
                    target = math.sqrt(budget / (6.0 * ratio))
                    shape = sizer.shape(target)
                    tokens = budget / count(shape).flops(spec.flops)
                    planned.append(_make(spec, shape, _steps(tokens, batch), target, budget))

    _check_sizes(spec, sizer, planned)
    _check_steps(spec, planned)
    return _unique(planned)


def _check_sizes(spec: SweepSpec, sizer: _Sizer, planned: list[PlannedRun]) -> None:
    smallest = sizer.size(count(sizer.smallest))
    for run in planned:
        if run.run.target_params < smallest / 2:
            field = "plan.params" if run.run.target_compute is None else "plan.compute"
            raise SpecError(
                f"{field}: asks for a model of {run.run.target_params:,.0f} parameters, but the "
                f"smallest this model spec makes has {smallest:,} (one {spec.model.head_dim}-wide "
                "head, one block); raise the size or budget, or lower model.head_dim"
            )


def _check_steps(spec: SweepSpec, planned: list[PlannedRun]) -> None:
    field = "plan.tokens" if isinstance(spec.plan, GridPlan) else "plan.tokens_per_param"
    for run in planned:
        if run.run.steps < MIN_STEPS:
            raise SpecError(
                f"{field}: a run of {run.run.tokens:,} tokens is {run.run.steps} steps of "
                f"{spec.train.batch_tokens} tokens, under the minimum of {MIN_STEPS}; give it "
                "more tokens or lower train.batch_tokens"
            )


def _unique(planned: list[PlannedRun]) -> list[PlannedRun]:
    seen: set[str] = set()
    out = []
    for run in planned:
        if run.run.run_id not in seen:
            seen.add(run.run.run_id)
            out.append(run)
    return out

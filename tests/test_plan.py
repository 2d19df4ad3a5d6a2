"""Planners: budgets stay on budget, sizes follow the targets, impossible plans are refused."""

from __future__ import annotations

import math

import pytest

from scaling.errors import SpecError
from scaling.plan import plan_sweep
from scaling.spec import parse_sweep


def _spec(plan: dict, **sections) -> dict:
    raw = {
        "name": "p",
        "data": {"seq_len": 64},
        "model": {"head_dim": 16, "aspect_ratio": 32},
        "train": {"batch_tokens": 1024},
        "plan": plan,
    }
    raw.update(sections)
    return raw


def test_grid_crosses_sizes_and_tokens():
    planned = plan_sweep(
        parse_sweep(_spec({"kind": "grid", "params": [2e4, 1e5], "tokens": [1.024e5, 2.048e5]}))
    )
    assert len(planned) == 4
    assert sorted({p.run.tokens for p in planned}) == [102400, 204800]
    for p in planned:
        assert abs(math.log(p.counts.params / p.run.target_params)) < math.log(1.6)


def test_isoflop_keeps_each_budget_and_recomputes_tokens_from_achieved_size():
    budgets = [1e11, 1e12]
    spec = parse_sweep(
        _spec(
            {
                "kind": "isoflop",
                "compute": budgets,
                "sizes_per_budget": 4,
                "tokens_per_param": [10, 200],
            }
        )
    )
    planned = plan_sweep(spec)
    for budget in budgets:
        runs = [p for p in planned if p.run.target_compute == budget]
        assert len(runs) >= 3
        sizes = [p.counts.params for p in runs]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
        for p in runs:
            # D = C / (6 N) from the achieved N, rounded to whole batches of 1024 tokens
            assert p.run.tokens == round(budget / (6 * p.counts.params) / 1024) * 1024
            assert abs(p.compute / budget - 1) < 1024 / p.run.tokens


def test_isoflop_with_shape_convention_uses_counted_flops():
    spec = parse_sweep(
        {**_spec({"kind": "isoflop", "compute": [1e12], "params": [5e4, 2e5]}), "flops": "shape"}
    )
    for p in plan_sweep(spec):
        assert p.run.tokens == round(1e12 / p.counts.flops_per_token / 1024) * 1024


def test_ratio_plan_over_sizes_and_budgets():
    by_size = plan_sweep(
        parse_sweep(_spec({"kind": "ratio", "tokens_per_param": [20], "params": [5e4, 2e5]}))
    )
    for p in by_size:
        assert abs(p.run.tokens - 20 * p.counts.params) <= 512
    by_budget = plan_sweep(
        parse_sweep(_spec({"kind": "ratio", "tokens_per_param": [20], "compute": [1e12]}))
    )
    (p,) = by_budget
    assert abs(p.compute / 1e12 - 1) < 0.01


def test_budget_too_small_names_the_field():
    with pytest.raises(SpecError, match=r"plan.compute\[0\] = 1e\+07: too small"):
        plan_sweep(parse_sweep(_spec({"kind": "isoflop", "compute": [1e7], "params": [1e4, 5e4]})))


def test_size_below_smallest_model_is_refused():
    with pytest.raises(SpecError, match="plan.params: asks for a model of 10 parameters"):
        plan_sweep(parse_sweep(_spec({"kind": "grid", "params": [10], "tokens": [1e5]})))


def test_batch_must_hold_whole_sequences():
    raw = _spec({"kind": "grid", "params": [2e4], "tokens": [1e5]}, train={"batch_tokens": 1000})
    with pytest.raises(SpecError, match="train.batch_tokens = 1000: must be a multiple"):
        plan_sweep(parse_sweep(raw))


def test_ratio_needs_sizes_or_budgets():
    with pytest.raises(SpecError, match="exactly one of 'params' or 'compute'"):
        plan_sweep(parse_sweep(_spec({"kind": "ratio", "tokens_per_param": [20]})))


def test_moe_is_sized_by_active_parameters():
    raw = _spec(
        {"kind": "grid", "params": [1e5], "tokens": [1e5]},
        model={"family": "moe", "head_dim": 16, "num_experts": 8, "top_k": 2},
    )
    (p,) = plan_sweep(parse_sweep(raw))
    assert p.counts.params > p.counts.params_active
    assert abs(math.log(p.counts.params_active / 1e5)) < math.log(1.6)

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from synthetic import TRUTH, chinchilla_loss, isoflop_sweep

from scaling.errors import FitError
from scaling.fit.approaches import all_approaches, approach_1, approach_2, budget_groups
from scaling.fit.compare import compare_laws, extrapolation_check

TRUE_A = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])


@pytest.fixture(scope="module")
def curves() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training curves L(N, D_t) from the true law (0.3% noise), 16 sizes over 3 decades."""
    rng = np.random.default_rng(0)
    frames, runs = [], []
    for i, n in enumerate(np.geomspace(1e7, 1e10, 16)):
        tokens = np.geomspace(1e8, 200 * n, 200)
        loss = chinchilla_loss(n, tokens) * np.exp(0.003 * rng.standard_normal(len(tokens)))
        frames.append(
            pd.DataFrame(
                {
                    "run_id": f"r{i}",
                    "step": np.arange(len(tokens)),
                    "tokens": tokens,
                    "compute": 6 * n * tokens,
                    "train_loss": loss,
                    "val_loss": np.nan,
                }
            )
        )
        runs.append(
            {
                "run_id": f"r{i}",
                "params": n,
                "tokens": tokens[-1],
                "loss": loss[-1],
                "status": "done",
            }
        )
    runs = pd.DataFrame(runs)
    runs["compute"] = 6 * runs["params"] * runs["tokens"]
    return pd.concat(frames, ignore_index=True), runs


def test_approach_1_recovers_allocation(curves):
    alloc = approach_1(*curves, bootstrap=50)
    assert alloc.a == pytest.approx(TRUE_A, abs=0.03)
    assert alloc.ci["a"][0] < alloc.a < alloc.ci["a"][1]


def test_approach_2_recovers_allocation(synthetic):
    alloc = approach_2(synthetic, bootstrap=50)
    assert alloc.a == pytest.approx(TRUE_A, abs=0.03)
    assert alloc.b == pytest.approx(1 - TRUE_A, abs=0.03)
    assert len(alloc.points) == 11


def test_three_approaches_side_by_side(synthetic, curves):
    # One results set: the IsoFLOP runs plus the runs whose curves were logged (their lone
    # budgets have too few sizes for approach 2 and are left out there).
    data = pd.concat([synthetic, curves[1]], ignore_index=True)
    table = all_approaches(data, curves=curves[0], bootstrap=30)
    assert len(table) == 3
    for name, entry in table.items():
        assert entry["allocation"]["a"] == pytest.approx(TRUE_A, abs=0.03), name
        assert entry["allocation"]["ci"]["a"] is not None, name


def test_approach_1_without_curves_has_a_reason(synthetic):
    table = all_approaches(synthetic, bootstrap=0)
    assert table["1 (training-curve envelope)"]["allocation"] is None
    assert "training curves" in table["1 (training-curve envelope)"]["reason"]


def test_budget_grouping_tolerance():
    runs = pd.DataFrame({"compute": [1e18, 1.02e18, 0.99e18, 3e18, 3.1e18]})
    groups = budget_groups(runs)
    assert len(np.unique(groups)) == 2
    runs["budget"] = [1, 1, 1, 2, 3]
    assert len(np.unique(budget_groups(runs))) == 3


def test_approach_2_needs_budgets():
    data = isoflop_sweep(np.array([1e19]), 6, 0.0, 0)
    with pytest.raises(FitError, match="at least 2 budgets"):
        approach_2(data)


def test_extrapolation_check_and_comparison(synthetic):
    fit_result, held = extrapolation_check(synthetic, "chinchilla", bootstrap=30, level=0.9)
    assert len(held) == 10 and fit_result.n_points == 100
    assert held["rel_error"].abs().max() < 0.05
    assert {"low", "high", "covered"} <= set(held.columns)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = compare_laws(synthetic, ["chinchilla", "nd-noE"], bootstrap=20)
    assert list(table["law"]) == ["chinchilla", "nd-noE"]
    chinchilla, no_e = table.iloc[0], table.iloc[1]
    # The true law has an irreducible loss: dropping E must fit and extrapolate worse.
    assert chinchilla["aic"] < no_e["aic"] and chinchilla["bic"] < no_e["bic"]
    assert chinchilla["holdout_mean_abs_error"] < no_e["holdout_mean_abs_error"]

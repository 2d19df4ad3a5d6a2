from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from synthetic import TRUTH, isoflop_sweep

from scaling.errors import FitError
from scaling.fit.fitter import FitResult, fit, predict

# Besiroglu et al. 2024 grid fit of E + A/N^α + B/D^β on the 240 points (shared/data/README.md,
# row "grid fit"): summed Huber (δ = 1e-3) on log residuals, L-BFGS from a grid.
PUBLISHED = {"E": 1.817, "A": 478.0, "B": 2143.0, "alpha": 0.347, "beta": 0.367}


def _quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(*args, **kwargs)


def test_synthetic_chinchilla_recovered(synthetic):
    result = _quiet_fit(synthetic, "chinchilla")
    assert result.success
    assert result.params["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.03)
    assert result.params["beta"] == pytest.approx(TRUTH["beta"], abs=0.03)
    true_a = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    assert result.allocation.method == "closed-form"
    assert result.allocation.a == pytest.approx(true_a, abs=0.02)
    assert result.allocation.a + result.allocation.b == pytest.approx(1.0)


def test_published_chinchilla_fit(chinchilla_points):
    result = _quiet_fit(chinchilla_points, "chinchilla")
    assert result.n_points == 240
    for name, value in PUBLISHED.items():
        assert result.params[name] == pytest.approx(value, rel=0.01), name
    a = PUBLISHED["beta"] / (PUBLISHED["alpha"] + PUBLISHED["beta"])
    assert result.allocation.a == pytest.approx(a, abs=0.005)


def test_averaged_huber_gives_the_same_fit(chinchilla_points):
    summed = _quiet_fit(chinchilla_points, "chinchilla")
    averaged = _quiet_fit(chinchilla_points, "chinchilla", reduction="mean")
    for name, value in summed.params.items():
        assert averaged.params[name] == pytest.approx(value, rel=1e-6), name
    assert averaged.objective == pytest.approx(summed.objective / 240)


def test_uniform_weights_scale_does_not_matter(synthetic):
    one = _quiet_fit(synthetic, "chinchilla")
    tiny = _quiet_fit(synthetic, "chinchilla", weights=np.full(len(synthetic), 1e-4))
    for name, value in one.params.items():
        assert tiny.params[name] == pytest.approx(value, rel=1e-5), name


def test_ndc_law_fits(synthetic):
    result = _quiet_fit(synthetic, "ndc")
    assert set(result.params) == {"E", "a", "alpha", "b", "beta", "c", "gamma"}
    assert result.allocation is not None and result.allocation.method == "numerical"
    assert np.isfinite(result.objective)


def test_fewer_points_than_params():
    frame = isoflop_sweep(np.array([1e18, 1e19]), 2, 0.0, 0)
    with pytest.raises(FitError, match="4 runs for 5 parameters"):
        fit(frame, "chinchilla")


def test_not_done_runs_left_out_with_warning(synthetic):
    frame = synthetic.copy()
    frame.loc[3, "status"] = "diverged"
    frame.loc[5, "status"] = "failed"
    with pytest.warns(UserWarning, match=r"run3 \(diverged\), run5 \(failed\)"):
        result = fit(frame, "chinchilla")
    assert result.n_points == len(frame) - 2


def test_exclusion_reported(synthetic):
    result = _quiet_fit(synthetic, "chinchilla", exclude="compute > 5e21")
    assert result.n_points == len(synthetic) - 10
    assert len(result.excluded) == 10 and result.exclude == ["compute > 5e21"]
    with pytest.raises(FitError, match="--exclude 'nonsense >'"):
        fit(synthetic, "chinchilla", exclude="nonsense >")


def test_json_round_trip_and_predict(tmp_path, synthetic):
    result = _quiet_fit(synthetic, "chinchilla", bootstrap=30, seed=1)
    d = result.to_dict()
    for key in ("law", "formula", "params", "stderr", "ci", "n_points", "objective"):
        assert key in d
    assert set(d["allocation"]) >= {"a", "b", "coefficients"}
    assert isinstance(d["warnings"], list)
    assert set(d["ci"]) == set(d["params"]) and len(d["ci"]["alpha"]) == 2
    json.dumps(d, allow_nan=False)

    path = tmp_path / "fit.json"
    result.save(path)
    loaded = FitResult.load(path)
    assert loaded.params == pytest.approx(result.params)
    out = predict(loaded, params=1e9, tokens=2e10)
    truth = TRUTH["E"] + TRUTH["A"] * 1e9 ** -TRUTH["alpha"] + TRUTH["B"] * 2e10 ** -TRUTH["beta"]
    assert out["loss"] == pytest.approx(truth, rel=0.01)
    assert out["interval"][0] < out["loss"] < out["interval"][1]
    assert out["compute"] == pytest.approx(6 * 1e9 * 2e10)

    best = predict(loaded, compute=1e21)
    assert best["params"] == pytest.approx(loaded.allocation.n_opt(1e21), rel=1e-3)
    assert best["tokens"] == pytest.approx(1e21 / (6 * best["params"]))
    assert best["interval"] is not None


def test_predict_without_bootstrap_gives_reason(synthetic):
    result = _quiet_fit(synthetic, "chinchilla")
    out = predict(result, compute=1e20)
    assert out["interval"] is None and "bootstrap" in out["interval_reason"]


def test_flops_factor_is_a_parameter(synthetic):
    six = _quiet_fit(synthetic, "chinchilla")
    eight = _quiet_fit(synthetic, "chinchilla", flops_per_param_token=8.0)
    assert eight.allocation.a == pytest.approx(six.allocation.a)
    # N_opt at a budget: (C/8)^a instead of (C/6)^a.
    ratio = eight.allocation.n_opt(1e21) / six.allocation.n_opt(1e21)
    assert ratio == pytest.approx((6 / 8) ** six.allocation.a, rel=1e-6)


def test_compute_law_has_no_allocation(synthetic):
    result = _quiet_fit(synthetic, "compute")
    assert set(result.params) == {"E", "c", "gamma"}
    assert result.allocation is None
    out = predict(result, compute=1e21)
    assert out["params"] is None and out["loss"] > 1.69


def test_three_points_three_params():
    frame = pd.DataFrame(
        {"params": [1e8, 1e9, 1e10], "tokens": [2e9, 2e10, 2e11], "loss": [3.5, 2.8, 2.4]}
    )
    frame["compute"] = 6 * frame["params"] * frame["tokens"]
    result = _quiet_fit(frame, "n")
    assert result.success
    assert any("interval unavailable" in w for w in result.warnings)
    assert any("fewer than twice the parameters" in w for w in result.warnings)
    assert all(v is None for v in result.ci.values())
    json.dumps(result.to_dict(), allow_nan=False)


def test_parameter_on_bound():
    # Loss does not depend on N at all: alpha is driven to its bound 0 (or A vanishes).
    frame = isoflop_sweep(np.geomspace(1e18, 1e21, 4), 6, 0.0, 0)
    frame["loss"] = 1.8 + 400 * frame["tokens"] ** -0.3
    result = _quiet_fit(frame, "chinchilla", bootstrap=20)
    assert result.at_bound, result.params
    assert any("sits on its bound" in w for w in result.warnings)
    json.dumps(result.to_dict(), allow_nan=False)


def test_no_spread_in_tokens():
    n = np.geomspace(1e8, 1e10, 12)
    frame = pd.DataFrame({"params": n, "tokens": np.full(12, 1e10)})
    frame["compute"] = 6 * frame["params"] * frame["tokens"]
    frame["loss"] = 1.7 + 400 * n**-0.34 + 400 * 1e10**-0.28
    result = _quiet_fit(frame, "chinchilla")
    assert any("fewer than 3 distinct D per N" in w for w in result.warnings)
    assert any("interval unavailable" in w or "standard error" in w for w in result.warnings)
    out = predict(result, params=1e9, tokens=1e10)
    assert out["loss"] == pytest.approx(frame["loss"].iloc[6], rel=0.01)

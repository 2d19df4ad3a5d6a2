from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from synthetic import TRUTH

from scaling.errors import FitError
from scaling.fit.allocate import allocation_samples, optimal_split
from scaling.fit.fitter import fit
from scaling.fit.laws import Law, get_law, law_from_dict, parse_param_range

X = {
    "N": np.geomspace(1e7, 1e10, 9),
    "D": np.geomspace(1e9, 1e11, 9)[::-1].copy(),
    "C": np.geomspace(1e17, 1e21, 9),
    "U": np.geomspace(1e8, 1e10, 9),
}


@pytest.mark.parametrize("name", ["chinchilla", "ndc", "nd-noE", "c", "kaplan", "muennighoff"])
def test_jacobian_matches_finite_differences(name):
    law = get_law(name)
    rng = np.random.default_rng(0)
    u = law.grid()[rng.integers(0, len(law.grid()), 3)] + 0.1
    _, jac = law.log_predict_jac(u, X)
    _, numeric = Law.log_predict_jac(law, u, X)  # the base class's central differences
    np.testing.assert_allclose(jac, numeric, rtol=1e-5, atol=1e-7)


def test_additive_names_and_params():
    assert get_law("ndc").param_names == ["E", "a", "alpha", "b", "beta", "c", "gamma"]
    assert get_law("nd-noE").param_names == ["a", "alpha", "b", "beta"]
    assert get_law("chinchilla").param_names == ["E", "A", "alpha", "B", "beta"]
    assert get_law("chinchilla").formula == "E + A*N**-alpha + B*D**-beta"
    assert len(get_law("chinchilla").grid()) == 4500


def test_closed_form_matches_numerical_allocation():
    law = get_law("chinchilla")
    theta = np.array([[TRUTH[n] for n in law.param_names]])
    a, b, coef_n, coef_d = (x[0] for x in law.closed_form_allocation(theta, 6.0))
    assert a == pytest.approx(TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"]))
    budgets = np.geomspace(1e18, 1e24, 5)
    n_opt, _ = optimal_split(law, theta, budgets, 6.0)
    np.testing.assert_allclose(n_opt[0], coef_n * budgets**a, rtol=1e-4)
    # The same law written as a custom formula has no closed form: numerical route.
    custom = get_law("E + A*N**-alpha + B*D**-beta")
    order = [law.param_names.index(n) for n in custom.param_names]
    na, nb, ncn, _ = allocation_samples(custom, theta[:, order], 6.0)
    assert na[0] == pytest.approx(a, abs=1e-4) and nb[0] == pytest.approx(b, abs=1e-4)
    assert ncn[0] == pytest.approx(coef_n, rel=1e-2)


def test_parse_param_range():
    p = parse_param_range("alpha=0:2")
    assert (p.low, p.high, p.log) == (0.0, 2.0, False) and len(p.starts) == 4
    p = parse_param_range("A=0:inf:1,100,1e4")
    assert p.log and p.starts == (1.0, 100.0, 1e4)
    for bad, message in [
        ("alpha", "expected NAME=LOW:HIGH"),
        ("alpha=a:2", "must be numbers"),
        ("alpha=0:1:5", "outside"),
    ]:
        with pytest.raises(FitError, match=message):
            parse_param_range(bad)


def test_custom_law_round_trip():
    law = get_law("E + A*exp(-alpha*log(N))", [parse_param_range("alpha=0:2")])
    again = law_from_dict(law.to_dict())
    assert again.param_names == law.param_names == ["E", "A", "alpha"]
    theta = np.array([[1.5, 400.0, 0.3]])
    np.testing.assert_allclose(again.predict(theta, X)[0], 1.5 + 400 * X["N"] ** -0.3)
    with pytest.raises(FitError, match="uses none of N, D, C, U"):
        get_law("E + A*alpha")


def test_data_constrained_law_needs_unique_tokens():
    frame = pd.DataFrame({"params": X["N"], "tokens": X["D"], "compute": X["C"], "loss": 3.0})
    with pytest.raises(FitError, match="needs a 'unique_tokens' column"):
        fit(frame, "muennighoff")


def test_data_constrained_law_reduces_without_repetition():
    law = get_law("muennighoff")
    theta = np.array([[1.7, 400.0, 0.34, 410.0, 0.28, 15.4]])
    plain = get_law("chinchilla").predict(np.array([[1.7, 400.0, 0.34, 410.0, 0.28]]), X)
    same = law.predict(theta, {**X, "U": X["D"]})
    np.testing.assert_allclose(same, plain)
    repeated = law.predict(theta, {**X, "U": X["D"] / 10})
    assert np.all(repeated > plain)


def test_kaplan_law_at_published_values():
    law = get_law("kaplan")
    theta = np.array([[6.4e13, 0.076, 1.8e13, 0.095]])  # Kaplan et al. 2020, eq. 1.5
    n, d = 1e9, 1e10
    expected = ((6.4e13 / n) ** (0.076 / 0.095) + 1.8e13 / d) ** 0.095
    assert law.predict(theta, {"N": np.array([n]), "D": np.array([d])})[0, 0] == pytest.approx(
        expected
    )
    assert math.isfinite(expected)


def test_data_constrained_law_recovers_decay_constant():
    from synthetic import isoflop_sweep

    data = isoflop_sweep(np.geomspace(1e17, 1e21, 7), 8, 0.0, 0)
    rng = np.random.default_rng(1)
    data["unique_tokens"] = data["tokens"] / rng.choice([1, 2, 4, 8, 16], len(data))
    law = get_law("muennighoff")
    theta = np.array([[1.69, 406.4, 0.34, 410.7, 0.28, 15.4]])  # R_D* of Muennighoff et al.
    X = {"N": data["params"].values, "D": data["tokens"].values, "U": data["unique_tokens"].values}
    data["loss"] = law.predict(theta, X)[0] * np.exp(0.005 * rng.standard_normal(len(data)))
    with pytest.warns(UserWarning):
        result = fit(data, "muennighoff")
    assert result.params["R_star"] == pytest.approx(15.4, rel=0.25)
    assert result.params["beta"] == pytest.approx(0.28, abs=0.03)

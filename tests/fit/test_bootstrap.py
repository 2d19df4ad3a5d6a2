from __future__ import annotations

import warnings

import numpy as np
import pytest
from synthetic import TRUTH, isoflop_sweep

from scaling.fit.fitter import fit


def test_bootstrap_interval_coverage():
    """90% percentile intervals for alpha and beta cover the truth in 15..20 of 20 data sets."""
    covered = {"alpha": 0, "beta": 0}
    for seed in range(20):
        data = isoflop_sweep(np.geomspace(1e17, 1e21, 7), 8, noise=0.01, seed=100 + seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit(data, "chinchilla", bootstrap=100, seed=seed, ci_level=0.9)
        assert result.ci_method == "bootstrap"
        for name in covered:
            low, high = result.ci[name]
            covered[name] += low <= TRUTH[name] <= high
    assert 15 <= covered["alpha"] <= 20, covered
    assert 15 <= covered["beta"] <= 20, covered


def test_bootstrap_is_seeded_and_covers_allocation(synthetic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = fit(synthetic, "chinchilla", bootstrap=40, seed=3)
        two = fit(synthetic, "chinchilla", bootstrap=40, seed=3)
    np.testing.assert_array_equal(one.bootstrap_samples, two.bootstrap_samples)
    low, high = one.allocation.ci["a"]
    assert low < one.allocation.a < high
    assert one.bootstrap_samples.shape == (40, 5)
    assert one.ci["E"][0] < one.params["E"] < one.ci["E"][1]


def test_bootstrap_json_is_compact(synthetic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(synthetic, "chinchilla", bootstrap=50, seed=0)
    samples = result.to_dict()["bootstrap"]["samples"]
    assert len(samples) == 50
    assert all(len(repr(x)) <= 13 for row in samples for x in row)  # six significant digits
    assert samples[0][2] == pytest.approx(result.bootstrap_samples[0, 2], rel=1e-5)

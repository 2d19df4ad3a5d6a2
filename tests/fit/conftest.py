"""Shared data for the fit tests: a synthetic Chinchilla-law sweep and the published points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic import CHINCHILLA_CSV, isoflop_sweep  # noqa: E402

from scaling.fit.table import load_table


@pytest.fixture(scope="session")
def synthetic() -> pd.DataFrame:
    return isoflop_sweep(np.geomspace(1e17, 1e22, 11), 10, noise=0.01, seed=0)


@pytest.fixture(scope="session")
def chinchilla_points() -> pd.DataFrame:
    if not CHINCHILLA_CSV.exists():
        pytest.skip(f"shared Chinchilla data not found at {CHINCHILLA_CSV.resolve()}")
    table = load_table(CHINCHILLA_CSV, {"params": "Model Size", "compute": "Training FLOP"})
    # Besiroglu et al. 2024 drop the five highest-loss points (240 left).
    return table.sort_values("loss").iloc[:-5].reset_index(drop=True)

"""Synthetic scaling-law data shared by the fit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# The law Hoffmann et al. 2022 report (eq. 10): E = 1.69, A = 406.4, B = 410.7, α = 0.34,
# β = 0.28, used here as a known ground truth.
TRUTH = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}

#: The shared Chinchilla points, beside the repository: <repo>/../shared/data/...
CHINCHILLA_CSV = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "external"
    / "chinchilla_svg_extracted.csv"
)  # fmt: skip


def chinchilla_loss(n: np.ndarray, d: np.ndarray, p: dict = TRUTH) -> np.ndarray:
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def isoflop_sweep(
    budgets: np.ndarray, sizes_per_budget: int, noise: float, seed: int, k: float = 6.0
) -> pd.DataFrame:
    """Runs on IsoFLOP curves around the true optimum, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    G = (TRUTH["alpha"] * TRUTH["A"] / (TRUTH["beta"] * TRUTH["B"])) ** (
        1 / (TRUTH["alpha"] + TRUTH["beta"])
    )
    a = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    for c in budgets:
        n_opt = G * (c / k) ** a
        for n in n_opt * np.geomspace(1 / 8, 8, sizes_per_budget):
            d = c / (k * n)
            loss = chinchilla_loss(n, d) * np.exp(noise * rng.standard_normal())
            rows.append({"params": n, "tokens": d, "compute": c, "loss": loss})
    frame = pd.DataFrame(rows)
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    frame["status"] = "done"
    return frame

"""Hoffmann et al. 2022's three ways to the compute-optimal allocation, side by side.

1. Envelope of training curves: at each FLOP count, the run with the lowest loss gives
   N_opt(C); power laws are fitted through those (section 3.1).
2. IsoFLOP profiles: for each budget a parabola of loss against log N, its minimum, and power
   laws through the minima (section 3.2).
3. The parametric law E + A/N^α + B/D^β (or another form) and its allocation (section 3.3).

Intervals for approaches 1 and 2 come from a bootstrap over runs (within each budget for 2).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.errors import FitError, ResultsError
from scaling.fit.allocate import Allocation, percentile_interval, power_law_fit
from scaling.fit.laws import Law
from scaling.fit.table import done_runs

logger = logging.getLogger(__name__)

#: Runs whose compute agrees within this relative tolerance share an IsoFLOP budget.
BUDGET_TOLERANCE = 0.05


def budget_groups(runs: pd.DataFrame, tolerance: float = BUDGET_TOLERANCE) -> np.ndarray:
    """Budget of each run: the ``budget`` column, else the planned ``target_compute`` of a
    results folder, else compute grouped within ``tolerance``.

    Runs sorted by compute start a new group when their compute exceeds the group's first
    by more than the tolerance; each run gets its group's median compute.
    """
    if "budget" in runs.columns:
        return runs["budget"].to_numpy(dtype=float)
    if "target_compute" in runs.columns and runs["target_compute"].notna().all():
        return runs["target_compute"].to_numpy(dtype=float)
    compute = runs["compute"].to_numpy(dtype=float)
    order = np.argsort(compute)
    labels = np.empty(len(compute), dtype=int)
    group, first = -1, -np.inf
    for i in order:
        if compute[i] > first * (1 + tolerance):
            group, first = group + 1, compute[i]
        labels[i] = group
    medians = np.array([np.median(compute[labels == g]) for g in range(group + 1)])
    return medians[labels]


def _parabola_minima(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Vertex of the weighted least-squares parabola y ~ p0 + p1·x + p2·x² for each weight row.

    Returns the vertex x and a flag that the parabola opens upwards with its vertex no further
    than one grid span outside the data (else the minimum is not trustworthy).
    """
    V = np.stack([np.ones_like(x), x, x * x], axis=1)  # (n, 3)
    A = np.einsum("bn,ni,nj->bij", weights, V, V)
    rhs = np.einsum("bn,ni,n->bi", weights, V, y)
    with np.errstate(all="ignore"):
        ok = np.linalg.matrix_rank(A) == 3
        coef = np.full((len(weights), 3), np.nan)
        if ok.any():
            coef[ok] = np.linalg.solve(A[ok], rhs[ok][..., None])[..., 0]
        vertex = -coef[:, 1] / (2 * coef[:, 2])
    span = x.max() - x.min()
    good = ok & (coef[:, 2] > 0) & (vertex > x.min() - span) & (vertex < x.max() + span)
    return vertex, good


def approach_2(
    runs: pd.DataFrame,
    k: float = 6.0,
    bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
    tolerance: float = BUDGET_TOLERANCE,
) -> Allocation:
    """IsoFLOP parabolas: the loss-minimising N at each budget, and power laws through them.

    Parameters
    ----------
    runs
        Runs with ``params``, ``compute``, ``loss`` (and optionally ``budget``).
    k
        FLOP convention factor (D_opt = C/(k·N_opt)).
    bootstrap
        Resamples of the runs within each budget, for intervals.
    seed
        Bootstrap seed.
    level
        Interval level.
    tolerance
        Relative tolerance grouping compute values into budgets.

    Returns
    -------
    Allocation
        With ``points`` the (C, N_opt, D_opt) minima.

    Raises
    ------
    FitError
        Fewer than two budgets with a usable parabola (three or more distinct sizes).
    """
    runs = done_runs(runs, "approach 2")
    budgets = budget_groups(runs, tolerance)
    rng = np.random.default_rng(seed)
    minima, boot_minima, used = [], [], []
    for c in np.unique(budgets):
        group = runs[budgets == c]
        x = np.log(group["params"].to_numpy(dtype=float))
        y = group["loss"].to_numpy(dtype=float)
        if len(np.unique(np.round(x, 6))) < 3:
            logger.info("approach 2: budget %.3g has fewer than 3 sizes; left out", c)
            continue
        counts = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=bootstrap)
        weights = np.vstack([np.ones(len(x)), counts.astype(float)])
        vertex, good = _parabola_minima(x, y, weights)
        if not good[0]:
            logger.info("approach 2: budget %.3g has no interior minimum; left out", c)
            continue
        used.append(c)
        minima.append(np.exp(vertex[0]))
        boot_minima.append(np.where(good[1:], np.exp(vertex[1:]), np.nan))
    if len(used) < 2:
        raise FitError(
            f"approach 2 needs at least 2 budgets with 3 or more sizes and a minimum inside "
            f"them; found {len(used)} (budgets grouped within {tolerance:.0%} of compute)"
        )
    budgets_used = np.array(used)
    n_opt = np.array(minima)
    boot = np.array(boot_minima).T if bootstrap else None  # (B, m)
    return _power_laws(budgets_used, n_opt, boot, k, "approach 2", level)


def _power_laws(
    compute: np.ndarray,
    n_opt: np.ndarray,
    boot_n_opt: np.ndarray | None,
    k: float,
    method: str,
    level: float,
) -> Allocation:
    """Fit N_opt ∝ C^a, D_opt ∝ C^b through optima (and bootstrap optima for intervals)."""
    d_opt = compute / (k * n_opt)
    a, coef_n = power_law_fit(compute, n_opt)
    b, coef_d = power_law_fit(compute, d_opt)
    ci = None
    if boot_n_opt is not None and len(boot_n_opt):
        ba, bcn = power_law_fit(compute, boot_n_opt)
        bb, bcd = power_law_fit(compute, compute / (k * boot_n_opt))
        ci = {
            name: percentile_interval(v, level)
            for name, v in (("a", ba), ("b", bb), ("coef_n", bcn), ("coef_d", bcd))
        }
    points = [[float(c), float(n), float(d)] for c, n, d in zip(compute, n_opt, d_opt, strict=True)]
    return Allocation(float(a), float(b), float(coef_n), float(coef_d), method, k, ci, points)


def _curve_matrix(
    curves: pd.DataFrame, runs: pd.DataFrame, grid: np.ndarray, k: float, loss: str
) -> tuple[np.ndarray, np.ndarray]:
    """Loss of every run at every compute of ``grid`` (NaN outside its curve); and run sizes."""
    sizes = runs.drop_duplicates("run_id").set_index("run_id")["params"]
    missing = sorted(set(curves["run_id"]) - set(sizes.index))
    if missing:
        raise ResultsError(f"training curves of runs {missing[:5]} have no row in the runs table")
    matrix, n = [], []
    for run_id, curve in curves.groupby("run_id", sort=True):
        params = float(sizes[run_id])
        c = curve["compute"] if "compute" in curve else k * params * curve["tokens"]
        keep = np.isfinite(c.to_numpy(float)) & np.isfinite(curve[loss].to_numpy(float))
        c, y = c.to_numpy(float)[keep], curve[loss].to_numpy(float)[keep]
        if len(c) < 2:
            continue
        order = np.argsort(c)
        lc, y = np.log(c[order]), y[order]
        row = np.interp(np.log(grid), lc, y, left=np.nan, right=np.nan)
        matrix.append(row)
        n.append(params)
    return np.array(matrix), np.array(n)


def approach_1(
    curves: pd.DataFrame,
    runs: pd.DataFrame,
    k: float = 6.0,
    bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
    loss: str = "train_loss",
    n_grid: int = 60,
) -> Allocation:
    """Envelope of training curves: the lowest loss at each FLOP count across runs.

    At each of ``n_grid`` FLOP counts, the run with the lowest loss (interpolated in log C)
    gives N_opt. FLOP counts where that run is the smallest or the largest among the runs
    whose curves reach that count are left out, since the optimum may lie beyond them.

    Parameters
    ----------
    curves
        Columns ``run_id``, ``tokens`` or ``compute``, and the ``loss`` column.
    runs
        Runs with ``run_id`` and ``params``.
    k
        FLOP convention factor.
    bootstrap
        Resamples of the runs, for intervals.
    seed, level
        Bootstrap seed and interval level.
    loss
        Curve column to use (``train_loss``; ``val_loss`` where it is logged densely).
    n_grid
        Number of FLOP counts (log-spaced over the range of the curves).

    Returns
    -------
    Allocation
    """
    for column in ("run_id", loss):
        if column not in curves.columns:
            raise ResultsError(f"training curves: missing column {column!r}")
    runs = done_runs(runs, "approach 1")
    curves = curves[curves["run_id"].isin(set(runs["run_id"]))]
    if curves.empty:
        raise FitError("approach 1 needs training curves of finished runs; none found")
    c_all = curves["compute"] if "compute" in curves else None
    if c_all is None:
        sizes = runs.set_index("run_id")["params"]
        c_all = k * curves["run_id"].map(sizes) * curves["tokens"]
    c_all = c_all[c_all > 0]
    grid = np.geomspace(c_all.min(), c_all.max(), n_grid)
    matrix, sizes = _curve_matrix(curves, runs, grid, k, loss)

    def envelope(mask: np.ndarray) -> np.ndarray:
        sub, n = matrix[mask], sizes[mask]
        covered = np.isfinite(sub)
        best = np.argmin(np.where(covered, sub, np.inf), axis=0)
        lo = np.where(covered, n[:, None], np.inf).min(0)
        hi = np.where(covered, n[:, None], -np.inf).max(0)
        winner = n[best]
        inside = covered.any(0) & (winner > lo) & (winner < hi)
        return np.where(inside, winner, np.nan)

    n_opt = envelope(np.ones(len(sizes), dtype=bool))
    keep = np.isfinite(n_opt)
    if keep.sum() < 3:
        raise FitError(
            f"approach 1: only {int(keep.sum())} FLOP counts have an optimum strictly inside "
            f"the sizes trained; need 3 (train more sizes, or longer)"
        )
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        chosen = np.zeros(len(sizes), dtype=bool)
        chosen[rng.integers(0, len(sizes), len(sizes))] = True
        boot.append(envelope(chosen)[keep])
    boot_arr = np.array(boot) if bootstrap else None
    return _power_laws(grid[keep], n_opt[keep], boot_arr, k, "approach 1", level)


def load_curves_for(source: str | Path | None, curves: str | Path | None) -> pd.DataFrame | None:
    """Training curves from a table file, or from a results folder; None when there are none."""
    if curves is not None:
        path = Path(curves)
        if not path.exists():
            raise ResultsError(f"{path}: no such curves table")
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if source is not None and Path(source).is_dir():
        from scaling.results import load_curves

        frame = load_curves(source)
        return None if frame.empty else frame
    return None


def approach_allocation(
    approach: int,
    data: pd.DataFrame,
    *,
    source: str | Path | None = None,
    curves: str | Path | pd.DataFrame | None = None,
    law: Law | str = "chinchilla",
    k: float = 6.0,
    bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> Allocation:
    """The allocation by one of Hoffmann et al.'s approaches (1, 2 or 3)."""
    if approach == 1:
        frame = curves if isinstance(curves, pd.DataFrame) else load_curves_for(source, curves)
        if frame is None:
            raise FitError(
                "approach 1 needs training curves: give a results folder that has them, "
                "or --curves TABLE with run_id, tokens or compute, train_loss"
            )
        return approach_1(frame, data, k, bootstrap, seed, level)
    if approach == 2:
        return approach_2(data, k, bootstrap, seed, level)
    if approach == 3:
        from scaling.fit.fitter import fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit(
                data, law, bootstrap=bootstrap, seed=seed, ci_level=level, flops_per_param_token=k
            )
        if result.allocation is None:
            raise FitError(f"law {result.law.name!r} has no compute-optimal allocation")
        return result.allocation
    raise FitError(f"approach {approach}: valid choices are 1, 2, 3")


def all_approaches(data: pd.DataFrame, **kwargs) -> dict[str, dict]:
    """Allocations by approaches 1, 2 and 3; an unavailable one carries its reason.

    Keyword arguments are those of `approach_allocation`.
    """
    names = {1: "1 (training-curve envelope)", 2: "2 (IsoFLOP parabolas)", 3: "3 (parametric)"}
    out: dict[str, dict] = {}
    for approach, name in names.items():
        try:
            alloc = approach_allocation(approach, data, **kwargs)
            out[name] = {"allocation": alloc.to_dict(), "reason": None}
        except (FitError, ResultsError) as exc:
            out[name] = {"allocation": None, "reason": str(exc)}
    return out

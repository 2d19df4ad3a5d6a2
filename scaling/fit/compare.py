"""Comparing law forms: information criteria and extrapolation to held-out runs.

The extrapolation check fits on all runs but those at the largest budget (or largest N),
predicts the held-out runs, and reports each one's relative error and whether the bootstrap
interval covers it. That is the question a scaling law is for: does it extrapolate?
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd

from scaling.errors import FitError
from scaling.fit.approaches import budget_groups
from scaling.fit.fitter import FitResult, fit, predict_arrays
from scaling.fit.laws import Law, get_law
from scaling.fit.table import done_runs

logger = logging.getLogger(__name__)


def information_criteria(result: FitResult) -> dict[str, float]:
    """AIC and BIC from the fit's log residuals under a Gaussian likelihood.

    NOTE: the fit minimises a Huber loss, not a Gaussian likelihood; the Gaussian form
    n·log(RSS/n) + penalty is a common approximation that ranks forms fitted to the same
    points. Compare values only between fits of the same runs.
    """
    r = result.log_residuals
    if r is None:
        return {"aic": math.nan, "bic": math.nan}
    n, p = len(r), len(result.params)
    rss = max(float(np.sum(r * r)), 1e-300)
    base = n * math.log(rss / n)
    return {"aic": base + 2 * p, "bic": base + p * math.log(n)}


def holdout_split(data: pd.DataFrame, by: str = "compute") -> np.ndarray:
    """Mask of the held-out runs: those at the largest budget, or with the largest N."""
    if by == "compute":
        budgets = budget_groups(data)
        return budgets == budgets.max()
    if by == "params":
        n = data["params"].to_numpy(dtype=float)
        return n >= n.max() / 1.25  # the largest size, allowing for rounding of shapes
    raise FitError(f"holdout {by!r}: valid choices are 'compute' and 'params'")


def extrapolation_check(
    data: pd.DataFrame,
    law: Law | str,
    by: str = "compute",
    bootstrap: int = 100,
    seed: int = 0,
    level: float = 0.9,
    k: float = 6.0,
) -> tuple[FitResult, pd.DataFrame]:
    """Fit without the largest budget (or N) and predict the held-out runs.

    Parameters
    ----------
    data
        Runs to fit.
    law
        Law or its name.
    by
        ``compute`` or ``params``.
    bootstrap, seed, level
        Bootstrap for the prediction intervals.
    k
        FLOP convention factor.

    Returns
    -------
    fit, table
        The fit on the kept runs, and one row per held-out run with ``loss``, ``predicted``,
        ``rel_error``, ``low``, ``high``, ``covered``.
    """
    data = done_runs(data, "extrapolation check").reset_index(drop=True)
    held = holdout_split(data, by)
    if held.all() or not held.any():
        raise FitError(f"holdout by {by}: need runs both at and below the largest {by}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(
            data[~held], law, bootstrap=bootstrap, seed=seed, ci_level=level,
            flops_per_param_token=k,
        )  # fmt: skip
    test = data[held]
    pred, interval = predict_arrays(result, test, level)
    table = pd.DataFrame(
        {
            "run_id": test["run_id"].to_numpy() if "run_id" in test else test.index.to_numpy(),
            "params": test["params"].to_numpy(),
            "tokens": test["tokens"].to_numpy(),
            "compute": test["compute"].to_numpy(),
            "loss": test["loss"].to_numpy(),
            "predicted": pred,
        }
    )
    table["rel_error"] = (table["predicted"] - table["loss"]) / table["loss"]
    if interval is not None:
        table["low"], table["high"] = interval[:, 0], interval[:, 1]
        table["covered"] = (table["loss"] >= table["low"]) & (table["loss"] <= table["high"])
    else:
        table["low"] = table["high"] = np.nan
        table["covered"] = pd.NA
    return result, table


def compare_laws(
    data: pd.DataFrame,
    laws: list[Law | str],
    holdout: str = "compute",
    bootstrap: int = 100,
    seed: int = 0,
    level: float = 0.9,
    k: float = 6.0,
) -> pd.DataFrame:
    """One row per law: fit quality on all runs and extrapolation to held-out runs.

    Parameters
    ----------
    data
        Runs to fit.
    laws
        Laws or their names.
    holdout
        ``compute`` (largest budget) or ``params`` (largest N) for the extrapolation check.
    bootstrap, seed, level
        Bootstrap for prediction intervals of the held-out runs.
    k
        FLOP convention factor.

    Returns
    -------
    pandas.DataFrame
        Columns ``law``, ``n_params``, ``objective``, ``aic``, ``bic``, ``a``, ``b``,
        ``holdout_mean_abs_error``, ``holdout_max_abs_error``, ``holdout_coverage``,
        ``n_warnings`` (or ``error`` when the law cannot be fitted).
    """
    rows = []
    for law in laws:
        law = get_law(law) if isinstance(law, str) else law
        row: dict = {"law": law.name if law.name != "custom" else law.formula}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full = fit(data, law, flops_per_param_token=k)
            _, held = extrapolation_check(data, law, holdout, bootstrap, seed, level, k)
        except FitError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        alloc = full.allocation
        row.update(
            n_params=len(full.params),
            objective=full.objective,
            **information_criteria(full),
            a=alloc.a if alloc else math.nan,
            b=alloc.b if alloc else math.nan,
            holdout_mean_abs_error=float(held["rel_error"].abs().mean()),
            holdout_max_abs_error=float(held["rel_error"].abs().max()),
            holdout_coverage=float(held["covered"].astype(float).mean()),
            n_warnings=len(full.warnings),
        )
        rows.append(row)
    return pd.DataFrame(rows)

"""Compute-optimal allocation: how to split a FLOP budget C = k·N·D between N and D.

A law with a closed form (E + A/N^α + B/D^β) gives the exponents directly; any other law is
minimised numerically along k·N·D = C at several budgets and power laws N_opt ∝ C^a,
D_opt ∝ C^b are fitted through the minima.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from scaling.fit.laws import Law

logger = logging.getLogger(__name__)

#: Budgets used for a numerical allocation when the data give no compute range.
DEFAULT_BUDGETS = np.geomspace(1e18, 1e24, 7)


@dataclass
class Allocation:
    """N_opt = coef_n·C^a and D_opt = coef_d·C^b under C = k·N·D.

    Attributes
    ----------
    a, b
        Exponents of N_opt and D_opt against C.
    coef_n, coef_d
        Coefficients of the two power laws.
    method
        ``closed-form``, ``numerical``, ``approach 1`` (training-curve envelope) or
        ``approach 2`` (IsoFLOP parabolas).
    flops_per_param_token
        The FLOP convention factor k.
    ci
        Interval for each of ``a``, ``b``, ``coef_n``, ``coef_d`` (from a bootstrap), or None.
    points
        The optima the power laws were fitted through, as rows (C, N_opt, D_opt), if any.
    """

    a: float
    b: float
    coef_n: float
    coef_d: float
    method: str
    flops_per_param_token: float = 6.0
    ci: dict[str, list[float]] | None = None
    points: list[list[float]] = field(default_factory=list)

    def n_opt(self, compute: float | np.ndarray) -> float | np.ndarray:
        """Compute-optimal parameter count at budget ``compute``."""
        return self.coef_n * np.asarray(compute, dtype=float) ** self.a

    def d_opt(self, compute: float | np.ndarray) -> float | np.ndarray:
        """Compute-optimal token count at budget ``compute``."""
        return self.coef_d * np.asarray(compute, dtype=float) ** self.b

    def to_dict(self) -> dict:
        """The fit JSON's ``allocation`` object."""
        return {
            "a": _num(self.a),
            "b": _num(self.b),
            "coefficients": {"N": _num(self.coef_n), "D": _num(self.coef_d)},
            "method": self.method,
            "flops_per_param_token": self.flops_per_param_token,
            "ci": self.ci,
            "points": self.points,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Allocation:
        """Inverse of `to_dict`."""
        coef = d.get("coefficients", {})
        return cls(
            a=_float(d["a"]),
            b=_float(d["b"]),
            coef_n=_float(coef.get("N")),
            coef_d=_float(coef.get("D")),
            method=d.get("method", "closed-form"),
            flops_per_param_token=float(d.get("flops_per_param_token", 6.0)),
            ci=d.get("ci"),
            points=d.get("points", []),
        )


def _num(x: float) -> float | None:
    """A JSON-safe float (None for NaN/inf)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def power_law_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and coefficients of y = coef·x^slope fitted in log-log space along the last axis.

    Non-finite ``y`` are left out row by row; rows with fewer than two points give NaN.
    """
    lx = np.log(np.broadcast_to(x, np.shape(y)))
    ly = np.log(np.where(np.asarray(y) > 0, y, np.nan))
    ok = np.isfinite(ly)
    count = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.where(ok, lx, 0).sum(-1) / count
        my = np.where(ok, ly, 0).sum(-1) / count
        dx = np.where(ok, lx - mx[..., None], 0)
        dy = np.where(ok, ly - my[..., None], 0)
        slope = (dx * dy).sum(-1) / (dx * dx).sum(-1)
    slope = np.where(count >= 2, slope, np.nan)
    return slope, np.exp(my - slope * mx)


def optimal_split(
    law: Law, theta: np.ndarray, compute: np.ndarray, k: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """Numerically minimise the law along k·N·D = C for each budget.

    Parameters
    ----------
    law
        The law.
    theta
        Parameter sets, shape (K, P).
    compute
        Budgets, shape (m,).
    k
        FLOP convention factor.

    Returns
    -------
    n_opt, loss
        Arrays (K, m); NaN where the minimum lies on the edge of the search range
        (no interior optimum, e.g. a zero exponent).
    """
    theta = np.atleast_2d(theta)
    compute = np.atleast_1d(np.asarray(compute, dtype=float))
    log_nd = np.log(compute / k)

    # Coarse pass: log N from 2% to 98% of log(N·D), then a fine pass around the best cell.
    frac = np.linspace(0.02, 0.98, 481)
    log_n = frac[None, :] * log_nd[:, None]  # (m, 481)
    loss = _loss_on_split(law, theta, compute, log_n, k)
    best = np.nanargmin(np.where(np.isfinite(loss), loss, np.inf), axis=-1)  # (K, m)
    edge = (best == 0) | (best == len(frac) - 1)
    step = (frac[1] - frac[0]) * log_nd
    centre = np.take_along_axis(np.broadcast_to(log_n, loss.shape), best[..., None], -1)[..., 0]
    offsets = np.linspace(-1.5, 1.5, 61)
    fine = centre[..., None] + offsets * step[None, :, None]  # (K, m, 61)
    fine_loss = _loss_on_split(law, theta, compute, fine, k)
    j = np.clip(np.nanargmin(np.where(np.isfinite(fine_loss), fine_loss, np.inf), -1), 1, 59)

    # Parabola through the best fine point and its two neighbours.
    y0, y1, y2 = (np.take_along_axis(fine_loss, (j + s)[..., None], -1)[..., 0] for s in (-1, 0, 1))
    h = (offsets[1] - offsets[0]) * step[None, :]
    denom = y0 - 2 * y1 + y2
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(denom > 0, 0.5 * h * (y0 - y2) / denom, 0.0)
    x1 = np.take_along_axis(fine, j[..., None], -1)[..., 0]
    n_opt = np.exp(x1 + np.clip(shift, -h, h))
    loss_opt = _loss_on_split(law, theta, compute, np.log(n_opt)[..., None], k)[..., 0]
    n_opt = np.where(edge, np.nan, n_opt)
    return n_opt, np.where(edge, np.nan, loss_opt)


def _loss_on_split(
    law: Law, theta: np.ndarray, compute: np.ndarray, log_n: np.ndarray, k: float
) -> np.ndarray:
    """Loss of each parameter set at N = exp(log_n), D = C/(kN); log_n is (m, g) or (K, m, g)."""
    n_sets = len(theta)
    shared = log_n.ndim == 2
    shape = (len(compute), log_n.shape[-1])
    c = np.broadcast_to(compute[:, None], shape).ravel()
    if shared:
        n = np.exp(log_n).ravel()
        X = {"N": n, "D": c / (k * n), "C": c}
        X["U"] = X["D"]  # NOTE: allocation assumes unique data is plentiful (no repetition)
        return law.predict(theta, X).reshape(n_sets, *shape)
    # Per-parameter-set grids: evaluate one set at a time (K is at most a few thousand).
    out = np.empty(log_n.shape)
    for i in range(n_sets):
        n = np.exp(log_n[i]).ravel()
        X = {"N": n, "D": c / (k * n), "C": c}
        X["U"] = X["D"]
        out[i] = law.predict(theta[i : i + 1], X).reshape(shape)
    return out


def allocation_samples(
    law: Law, theta: np.ndarray, k: float = 6.0, budgets: np.ndarray | None = None
) -> tuple[np.ndarray, ...] | None:
    """Allocation exponents and coefficients (a, b, coef_n, coef_d) for each parameter set.

    Parameters
    ----------
    law, theta
        Law and parameter sets (K, P).
    k
        FLOP convention factor.
    budgets
        Budgets over which numerical optima are fitted with power laws.

    Returns
    -------
    tuple of four arrays (K,), or None when the law has no allocation (it does not depend
    on both N and D).
    """
    if not {"N", "D"} <= set(law.variables):
        return None
    closed = law.closed_form_allocation(theta, k)
    if closed is not None:
        return tuple(np.asarray(x, dtype=float) for x in closed)
    budgets = DEFAULT_BUDGETS if budgets is None else np.asarray(budgets, dtype=float)
    n_opt, _ = optimal_split(law, theta, budgets, k)
    d_opt = budgets / (k * n_opt)
    a, coef_n = power_law_fit(budgets, n_opt)
    b, coef_d = power_law_fit(budgets, d_opt)
    return a, b, coef_n, coef_d


def allocate(
    law: Law,
    theta: np.ndarray,
    k: float = 6.0,
    budgets: np.ndarray | None = None,
    samples: np.ndarray | None = None,
    level: float = 0.95,
) -> Allocation | None:
    """The compute-optimal allocation of a fitted law.

    Parameters
    ----------
    law
        The law.
    theta
        Fitted parameters, shape (P,).
    k
        FLOP convention factor.
    budgets
        Budgets for a numerical allocation (the data's compute range is a good choice).
    samples
        Bootstrap parameter samples (B, P) for intervals on a, b and the coefficients.
    level
        Interval level.

    Returns
    -------
    Allocation or None
        None when the law does not depend on both N and D.
    """
    values = allocation_samples(law, np.atleast_2d(theta), k, budgets)
    if values is None:
        return None
    a, b, coef_n, coef_d = (float(v[0]) for v in values)
    method = "closed-form" if law.closed_form_allocation(np.atleast_2d(theta), k) else "numerical"
    ci = None
    if samples is not None and len(samples):
        boot = allocation_samples(law, samples, k, budgets)
        ci = {
            name: percentile_interval(v, level)
            for name, v in zip(("a", "b", "coef_n", "coef_d"), boot, strict=True)
        }
    points = []
    if budgets is not None:
        points = [[float(c), float(coef_n * c**a), float(coef_d * c**b)] for c in budgets]
    return Allocation(a, b, coef_n, coef_d, method, k, ci, points)


def percentile_interval(values: np.ndarray, level: float) -> list[float] | None:
    """Central percentile interval of the finite values, or None when there are fewer than 10."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return None
    tail = 50 * (1 - level)
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

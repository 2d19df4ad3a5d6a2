"""Fitting scaling laws: robust objective, global search, refinement, uncertainty.

The objective is the summed Huber loss of log residuals log L_pred − log L_obs (Hoffmann
et al. 2022, appendix D.2; Besiroglu et al. 2024). The search:

1. evaluate the objective at every point of a starting grid at once (numpy, shape (K, n));
2. run a batched, damped Gauss-Newton (iteratively reweighted for Huber) from all starts,
   then from the best few percent for longer;
3. polish the best distinct optima with L-BFGS-B and analytic gradients in log-parameter
   space, the objective rescaled to order one so that its overall scale (summed or averaged)
   does not change where the optimiser stops;
4. get standard errors and correlations from lmfit at the optimum.

A bootstrap over runs refits with resampling counts as weights, warm-started from the
full-data optimum and the next-best optima, all resamples in one batch.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lmfit
import numpy as np
import pandas as pd
from scipy.optimize import minimize

from scaling.errors import FitError, ResultsError
from scaling.fit.allocate import (
    Allocation,
    allocate,
    allocation_samples,
    optimal_split,
    percentile_interval,
)
from scaling.fit.laws import VARIABLES, Law, get_law, law_from_dict
from scaling.fit.table import DEFAULT_FLOPS_PER_PARAM_TOKEN, done_runs

logger = logging.getLogger(__name__)

#: Huber threshold on log residuals, Hoffmann et al. 2022, appendix D.2 (δ = 1e-3).
DEFAULT_HUBER_DELTA = 1e-3


# ---------------------------------------------------------------------------------------------
# Objective


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: r²/2 for |r| ≤ δ, δ(|r| − δ/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


class Objective:
    """Weighted summed Huber loss of log residuals for one law and one data set.

    Parameters
    ----------
    law
        The law.
    X
        Data arrays keyed N, D, C (and U), each shape (n,).
    log_loss
        Observed log loss, shape (n,).
    delta
        Huber threshold.
    """

    def __init__(self, law: Law, X: dict[str, np.ndarray], log_loss: np.ndarray, delta: float):
        self.law, self.X, self.log_loss, self.delta = law, X, log_loss, delta
        self.bounds = law.u_bounds

    def values(self, U: np.ndarray, W: np.ndarray, chunk: int = 2000) -> np.ndarray:
        """Objective for each row of ``U`` (K, P) with weights ``W`` (n,) or (K, n)."""
        out = np.empty(len(U))
        for s in range(0, len(U), chunk):
            w = W if W.ndim == 1 else W[s : s + chunk]
            with np.errstate(all="ignore"):
                r = self.law.log_predict(U[s : s + chunk], self.X) - self.log_loss
                out[s : s + chunk] = (w * huber(r, self.delta)).sum(-1)
        return np.where(np.isfinite(out), out, np.inf)

    def value_grad(self, u: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and gradient at one point ``u`` (P,)."""
        with np.errstate(all="ignore"):
            log_pred, jac = self.law.log_predict_jac(u[None, :], self.X)
        r = log_pred[0] - self.log_loss
        value = float((w * huber(r, self.delta)).sum())
        grad = jac[0] @ (w * np.clip(r, -self.delta, self.delta))
        if not math.isfinite(value) or not np.all(np.isfinite(grad)):
            return math.inf, np.zeros_like(u)
        return value, grad

    def gauss_newton(
        self, U: np.ndarray, W: np.ndarray, iters: int, tol: float = 1e-13
    ) -> tuple[np.ndarray, np.ndarray]:
        """Damped, iteratively reweighted Gauss-Newton from each row of ``U`` at once.

        For Huber, the gradient is Jᵀ·Ω·r with Ω = w·min(1, δ/|r|); the step solves
        (JᵀΩJ + λ·diag) s = −JᵀΩr, accepted when the objective falls (λ then shrinks).
        A row stops once five steps in a row lower its objective by less than ``tol``
        (relative); only the rows still moving are computed.
        """
        U = np.array(U, dtype=float)
        W = np.broadcast_to(W, (len(U), len(self.log_loss)))
        f = self.values(U, W)
        lam = np.full(len(U), 1e-2)
        stalled = np.zeros(len(U), dtype=int)
        for _ in range(iters):
            idx = np.flatnonzero(np.isfinite(f) & (stalled < 5))
            if not len(idx):
                break
            trial = self._step(U[idx], W[idx], lam[idx])
            f_trial = self.values(trial, W[idx])
            better = f_trial < f[idx]
            gain = np.where(better, (f[idx] - f_trial) / np.maximum(f[idx], 1e-300), 0.0)
            stalled[idx] = np.where(gain < tol, stalled[idx] + 1, 0)
            U[idx[better]], f[idx[better]] = trial[better], f_trial[better]
            lam[idx] = np.where(
                better, np.maximum(lam[idx] * 0.3, 1e-7), np.minimum(lam[idx] * 10, 1e7)
            )
        return U, f

    def _step(self, U: np.ndarray, W: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """One damped Gauss-Newton trial point for each row of ``U``."""
        with np.errstate(all="ignore"):
            log_pred, jac = self.law.log_predict_jac(U, self.X)  # (K, n), (K, P, n)
            r = log_pred - self.log_loss
            omega = W * np.minimum(1.0, self.delta / np.maximum(np.abs(r), 1e-300))
            jw = jac * np.sqrt(omega)[:, None, :]
            hess = np.einsum("kpn,kqn->kpq", jw, jw)
            grad = np.einsum("kpn,kn->kp", jac, omega * r)
        diag = np.diagonal(hess, axis1=1, axis2=2)
        damp = lam[:, None] * (diag + 1e-9 * diag.max(1, keepdims=True) + 1e-12)
        system = hess + damp[:, :, None] * np.eye(U.shape[1])
        ok = np.all(np.isfinite(system), axis=(1, 2)) & np.all(np.isfinite(grad), axis=1)
        step = np.zeros_like(U)
        try:
            step[ok] = np.linalg.solve(system[ok], -grad[ok][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step[ok] = -grad[ok] / np.maximum(np.diagonal(system[ok], 0, 1, 2), 1e-30)
        return np.clip(U + step, self.bounds[:, 0], self.bounds[:, 1])

    def polish(self, u0: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float, str]:
        """L-BFGS-B from ``u0``, then Gauss-Newton to convergence; the better point wins.

        The objective is divided by its starting value, so that tolerances do not depend on
        its scale (summed or averaged Huber, weights). L-BFGS-B is capped at 300 iterations:
        along the flat valleys of over-parameterised forms (ndc) it can crawl for thousands,
        where the Gauss-Newton pass converges in tens.
        """
        f0, _ = self.value_grad(u0, w)
        scale = f0 if math.isfinite(f0) and f0 > 0 else 1.0
        scale = max(scale, 1e-12 * self.delta**2 * float(w.sum()), 1e-300)

        def fun(u: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = self.value_grad(u, w)
            return value / scale, grad / scale

        bounds = list(map(tuple, self.bounds))
        res = minimize(
            fun,
            np.clip(u0, self.bounds[:, 0], self.bounds[:, 1]),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 300, "maxfun": 600, "ftol": 1e-15, "gtol": 1e-11},
        )
        value, _ = self.value_grad(res.x, w)
        u, message = (res.x, str(res.message)) if value <= f0 else (u0, str(res.message))
        refined, f_refined = self.gauss_newton(u[None, :], w, iters=300)
        if f_refined[0] < min(value, f0):
            return refined[0], float(f_refined[0]), message
        return u, min(value, f0), message


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class FitResult:
    """A fitted scaling law with its uncertainty and diagnostics.

    Attributes
    ----------
    law
        The law that was fitted.
    success
        Whether the optimiser converged to a finite optimum.
    message
        The optimiser's message, or why the fit is questionable.
    params
        Fitted values by name.
    stderr
        Standard errors by name (None where unavailable).
    correlations
        Correlations between parameters, ``{name: {other: corr}}``.
    ci
        Intervals ``{name: [low, high]}`` at ``ci_level`` (bootstrap percentiles when a
        bootstrap ran, else value ± z·stderr); None per parameter when unavailable.
    ci_method
        ``bootstrap``, ``stderr`` or ``unavailable``.
    n_points
        Number of runs fitted.
    objective
        Summed (or averaged, with ``reduction="mean"``) weighted Huber loss at the optimum.
    allocation
        Compute-optimal allocation, or None when the law has none.
    warnings
        Diagnostics, each a complete sentence.
    at_bound
        Parameters sitting on a bound.
    """

    law: Law
    success: bool
    message: str
    params: dict[str, float]
    stderr: dict[str, float | None]
    correlations: dict[str, dict[str, float]]
    ci: dict[str, list[float] | None]
    n_points: int
    objective: float
    allocation: Allocation | None = None
    warnings: list[str] = field(default_factory=list)
    at_bound: list[str] = field(default_factory=list)
    ci_level: float = 0.95
    ci_method: str = "unavailable"
    huber_delta: float = DEFAULT_HUBER_DELTA
    reduction: str = "sum"
    flops_per_param_token: float = DEFAULT_FLOPS_PER_PARAM_TOKEN
    excluded: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    data_range: dict[str, list[float]] = field(default_factory=dict)
    bootstrap_samples: np.ndarray | None = None
    bootstrap_seed: int | None = None
    log_residuals: np.ndarray | None = None

    @property
    def stderr_bootstrap(self) -> dict[str, float] | None:
        """Standard deviation of each parameter over the bootstrap samples, if any."""
        if self.bootstrap_samples is None or len(self.bootstrap_samples) < 2:
            return None
        sd = np.std(self.bootstrap_samples, axis=0, ddof=1)
        return {n: float(s) for n, s in zip(self.law.param_names, sd, strict=True)}

    @property
    def theta(self) -> np.ndarray:
        """Fitted parameters as an array in the law's order."""
        return np.array([self.params[n] for n in self.law.param_names], dtype=float)

    def to_dict(self) -> dict:
        """DESIGN.md's fit JSON (plus the fields `from_dict` needs to rebuild the result)."""
        boot = None
        if self.bootstrap_samples is not None:
            # Six significant digits keep 1,000 samples of five parameters near 60 kB.
            samples = [[float(f"{x:.6g}") for x in row] for row in self.bootstrap_samples]
            boot = {"n": len(samples), "seed": self.bootstrap_seed, "samples": samples}
        return _clean(
            {
                "law": self.law.name,
                "formula": self.law.formula,
                "params": {k: _json_num(v) for k, v in self.params.items()},
                "stderr": {k: _json_num(v) for k, v in self.stderr.items()},
                "stderr_bootstrap": self.stderr_bootstrap,
                "ci": self.ci,
                "n_points": self.n_points,
                "objective": _json_num(self.objective),
                "allocation": self.allocation.to_dict() if self.allocation else None,
                "warnings": list(self.warnings),
                "success": self.success,
                "message": self.message,
                "correlations": self.correlations,
                "at_bound": self.at_bound,
                "ci_level": self.ci_level,
                "ci_method": self.ci_method,
                "huber_delta": self.huber_delta,
                "reduction": self.reduction,
                "flops_per_param_token": self.flops_per_param_token,
                "excluded": self.excluded,
                "exclude": self.exclude,
                "data_range": self.data_range,
                "law_spec": self.law.to_dict(),
                "bootstrap": boot,
            }
        )

    @classmethod
    def from_dict(cls, d: dict, source: str = "fit JSON") -> FitResult:
        """Rebuild a result from `to_dict` output.

        Raises
        ------
        ResultsError
            A required key is missing.
        """
        missing = [k for k in ("law", "params", "n_points", "objective") if k not in d]
        if missing:
            raise ResultsError(f"{source}: not a fit JSON, missing keys {', '.join(missing)}")
        law = law_from_dict(d.get("law_spec") or {"name": d["law"]})
        boot = d.get("bootstrap") or None
        return cls(
            law=law,
            success=bool(d.get("success", True)),
            message=d.get("message", ""),
            params={k: _float(v) for k, v in d["params"].items()},
            stderr={k: None if v is None else float(v) for k, v in d.get("stderr", {}).items()},
            correlations=d.get("correlations", {}),
            ci=d.get("ci", {}),
            n_points=int(d["n_points"]),
            objective=_float(d["objective"]),
            allocation=Allocation.from_dict(d["allocation"]) if d.get("allocation") else None,
            warnings=list(d.get("warnings", [])),
            at_bound=list(d.get("at_bound", [])),
            ci_level=float(d.get("ci_level", 0.95)),
            ci_method=d.get("ci_method", "unavailable"),
            huber_delta=float(d.get("huber_delta", DEFAULT_HUBER_DELTA)),
            reduction=d.get("reduction", "sum"),
            flops_per_param_token=float(d.get("flops_per_param_token", 6.0)),
            excluded=list(d.get("excluded", [])),
            exclude=list(d.get("exclude", [])),
            data_range=d.get("data_range", {}),
            bootstrap_samples=np.array(boot["samples"], dtype=float) if boot else None,
            bootstrap_seed=boot.get("seed") if boot else None,
        )

    def save(self, path: str | Path) -> None:
        """Write the fit JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FitResult:
        """Read a fit JSON written by `save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ResultsError(f"{path}: no such fit file") from exc
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, str(path))


def _clean(obj):
    """Replace non-finite floats by None throughout a JSON-ready structure."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _json_num(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _json_num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


# ---------------------------------------------------------------------------------------------
# Data preparation


@dataclass
class FitData:
    """The arrays a fit works on, after filtering."""

    X: dict[str, np.ndarray]
    loss: np.ndarray
    weights: np.ndarray
    labels: list[str]
    excluded: list[str]

    @property
    def n(self) -> int:
        return len(self.loss)


def _labels(frame: pd.DataFrame) -> list[str]:
    if "run_id" in frame.columns:
        return [str(x) for x in frame["run_id"]]
    return [f"row {i}" for i in frame.index]


def prepare(
    data: pd.DataFrame,
    law: Law,
    exclude: str | list[str] | None = None,
    weights: str | np.ndarray | None = None,
) -> FitData:
    """Select the rows to fit and pull out the arrays the law needs.

    Parameters
    ----------
    data
        Runs with ``params``, ``tokens``, ``compute``, ``loss`` (``unique_tokens`` for the
        data-constrained law); rows whose ``status`` is not "done" are left out with a warning.
    law
        The law to be fitted.
    exclude
        pandas query expressions; rows matching any are left out and listed in the result.
    weights
        A column name or an array of per-row weights.

    Returns
    -------
    FitData
    """
    frame = done_runs(data, "fit data")
    w = np.ones(len(frame))
    if isinstance(weights, str):
        if weights not in frame.columns:
            raise FitError(f"weights column {weights!r} not found; columns: {list(frame.columns)}")
        w = frame[weights].to_numpy(dtype=float)
    elif weights is not None:
        w = np.asarray(weights, dtype=float)
        if len(w) != len(data):
            raise FitError(f"weights: {len(w)} values for {len(data)} rows")
        w = w[data.index.get_indexer(frame.index)]
    if np.any(~np.isfinite(w) | (w < 0)):
        raise FitError("weights must be finite and non-negative")

    exprs = [exclude] if isinstance(exclude, str) else list(exclude or [])
    drop = np.zeros(len(frame), dtype=bool)
    for expr in exprs:
        try:
            drop |= frame.eval(expr).to_numpy(dtype=bool)
        except Exception as exc:  # pandas raises many types for a bad expression
            raise FitError(f"--exclude {expr!r}: cannot evaluate on the data ({exc})") from exc
    excluded = [lab for lab, d in zip(_labels(frame), drop, strict=True) if d]
    frame, w = frame[~drop], w[~drop]

    X: dict[str, np.ndarray] = {}
    for var in law.variables:
        column = VARIABLES[var]
        if column not in frame.columns:
            raise FitError(
                f"law {law.name!r} needs a {column!r} column for {var}; "
                f"columns present: {', '.join(map(str, frame.columns))}"
            )
        X[var] = frame[column].to_numpy(dtype=float)
    for var, column in VARIABLES.items():
        if var not in X and column in frame.columns:
            X[var] = frame[column].to_numpy(dtype=float)
    loss = frame["loss"].to_numpy(dtype=float)
    bad = ~np.isfinite(loss) | (loss <= 0)
    for var in law.variables:
        bad |= ~np.isfinite(X[var]) | (X[var] <= 0)
    if bad.any():
        labels = [lab for lab, b in zip(_labels(frame), bad, strict=True) if b]
        raise FitError(f"non-positive or missing values in runs {', '.join(labels[:10])}")
    return FitData(X, loss, w, _labels(frame), excluded)


# ---------------------------------------------------------------------------------------------
# Fitting


def _distinct(U: np.ndarray, f: np.ndarray, count: int, tol: float = 1e-3) -> list[int]:
    """Indices of the ``count`` best rows of U that differ by more than ``tol``."""
    chosen: list[int] = []
    for i in np.argsort(f):
        if not np.isfinite(f[i]):
            break
        if all(np.max(np.abs(U[i] - U[j])) > tol for j in chosen):
            chosen.append(int(i))
        if len(chosen) == count:
            break
    return chosen


def global_search(
    obj: Objective, w: np.ndarray, starts: np.ndarray, keep: int = 3
) -> tuple[list[np.ndarray], list[float], int]:
    """Search from every start; return the best distinct optima (polished) and best start index.

    Parameters
    ----------
    obj
        The objective.
    w
        Weights (n,).
    starts
        Starting points in optimisation space (K, P).
    keep
        Number of distinct optima to polish and return.

    Returns
    -------
    optima, values, start
        Optima sorted by objective, their objective values, and the index of the start
        that led to the best one.
    """
    # Screen every start by its objective, run a short Gauss-Newton from the best 5% (at
    # least 64), then iterate the best 16 of those to convergence. On the Chinchilla points and
    # synthetic sweeps this reaches the optimum of an L-BFGS-B run from each of the 4,500 starts.
    f0 = obj.values(starts, w)
    top = np.argsort(f0)[: max(64, len(f0) // 20)]
    U1, f1 = obj.gauss_newton(starts[top], w, iters=10)
    best = np.argsort(f1)[:16]
    U2, f2 = obj.gauss_newton(U1[best], w, iters=300)
    top = top[best]

    # Polish the best optimum, and the other distinct ones that polishing could promote.
    chosen = _distinct(U2, f2, keep)
    if not chosen:
        return [], [], 0
    optima, values = [], []
    for rank, i in enumerate(chosen):
        if rank == 0 or f2[i] <= 1.01 * f2[chosen[0]]:
            u, value, _ = obj.polish(U2[i], w)
        else:
            u, value = U2[i], float(f2[i])
        optima.append(u)
        values.append(value)
    order = np.argsort(values)
    return [optima[i] for i in order], [values[i] for i in order], int(top[chosen[order[0]]])


def _uncertainty(
    obj: Objective, u: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray, str]:
    """Covariance in optimisation space from lmfit at ``u``; returns (cov, u, note).

    The residuals handed to lmfit are sign(r)·sqrt(2·w·huber(r)), whose sum of squares is
    twice the objective, so lmfit's least squares has the same optimum; its covariance is
    the Gauss-Newton one scaled by the reduced chi-square.

    NOTE: when δ is far below the typical residual (δ = 1e-3 against ~1e-2 on the Chinchilla
    points) this covariance runs small: there it gives about half the standard errors that
    Besiroglu et al. 2024 report and that our bootstrap reproduces (α: 0.0087 against 0.015).
    Prefer the bootstrap intervals (``--bootstrap``), also summarised as ``stderr_bootstrap``.
    """
    names = [f"u{j}" for j in range(len(u))]
    params = lmfit.Parameters()
    # Unbounded on purpose: lmfit's bound transformation shrinks the covariance it reports
    # (by ~40% on the Chinchilla points); a step out of the law's domain is caught below.
    for name, value in zip(names, u, strict=True):
        params.add(name, value=float(value))

    def residual(p: lmfit.Parameters) -> np.ndarray:
        vec = np.array([p[n].value for n in names])
        r = obj.law.log_predict(vec[None, :], obj.X)[0] - obj.log_loss
        return np.sign(r) * np.sqrt(2 * w * huber(r, obj.delta))

    n_free = int(np.count_nonzero(w)) - len(u)
    if n_free <= 0:
        return None, u, f"no degrees of freedom ({int(np.count_nonzero(w))} points)"
    confounded = _unidentified(obj, u, w)
    if confounded:
        return None, u, f"covariance singular: {', '.join(confounded)} not identifiable together"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = lmfit.minimize(residual, params, method="leastsq", max_nfev=200 * len(u))
        except ValueError as exc:  # lmfit refuses a step where the law is not finite
            return None, u, f"covariance unavailable: the refinement left the law's domain ({exc})"
    u_new = np.array([out.params[n].value for n in names])
    if np.all(np.isfinite(u_new)) and np.all(u_new >= obj.bounds[:, 0]):
        if (
            np.all(u_new <= obj.bounds[:, 1])
            and obj.values(u_new[None], w)[0] < obj.values(u[None], w)[0]
        ):
            u = u_new
    if out.covar is None:
        return None, u, "covariance singular (parameters not identifiable from these data)"
    return np.asarray(out.covar), u, ""


def _unidentified(obj: Objective, u: np.ndarray, w: np.ndarray) -> list[str]:
    """Parameters along a (near) null direction of the Huber-residual Jacobian, if any."""
    log_pred, jac = obj.law.log_predict_jac(u[None, :], obj.X)
    r = log_pred[0] - obj.log_loss
    a = np.abs(r)
    # d/dr of sign(r)·sqrt(2·huber(r)): 1 inside δ, δ/sqrt(2δ(|r| − δ/2)) beyond.
    with np.errstate(invalid="ignore", divide="ignore"):
        beyond = obj.delta / np.sqrt(2 * obj.delta * (a - obj.delta / 2))
    slope = np.where(a <= obj.delta, 1.0, beyond)
    J = (jac[0] * (np.sqrt(w) * slope)[None, :]).T  # (n, P)
    norms = np.linalg.norm(J, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(J)):
        return [p.name for p, z in zip(obj.law.params, norms == 0, strict=True) if z] or ["all"]
    _, sv, vt = np.linalg.svd(J / norms, full_matrices=False)
    null = np.abs(vt[sv <= 1e-7 * sv[0]]).max(axis=0, initial=0.0)
    return [p.name for p, v in zip(obj.law.params, null, strict=True) if v > 0.1]


def fit(
    data: pd.DataFrame,
    law: str | Law = "chinchilla",
    *,
    huber_delta: float = DEFAULT_HUBER_DELTA,
    reduction: str = "sum",
    weights: str | np.ndarray | None = None,
    exclude: str | list[str] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    flops_per_param_token: float = DEFAULT_FLOPS_PER_PARAM_TOKEN,
    starts: np.ndarray | None = None,
) -> FitResult:
    """Fit a scaling law to runs.

    Parameters
    ----------
    data
        One row per run: ``params``, ``tokens``, ``compute``, ``loss`` (see `prepare`).
    law
        A `Law`, a built-in law name, or a formula.
    huber_delta
        Huber threshold δ on log residuals.
    reduction
        ``sum`` (Hoffmann et al.) or ``mean``: only the reported objective changes.
    weights
        Per-run weights (column name or array).
    exclude
        pandas query expressions selecting runs to leave out.
    bootstrap
        Number of bootstrap resamples over runs (0: none).
    seed
        Seed of the bootstrap.
    ci_level
        Level of the intervals.
    flops_per_param_token
        FLOP convention factor k in C = k·N·D.
    starts
        Starting grid in optimisation space (K, P); the law's grid by default.

    Returns
    -------
    FitResult

    Raises
    ------
    FitError
        Fewer runs than parameters, or unusable data.
    """
    law = get_law(law) if isinstance(law, str) else law
    if reduction not in ("sum", "mean"):
        raise FitError(f"reduction {reduction!r}: valid choices are 'sum' and 'mean'")
    if not huber_delta > 0:
        raise FitError(f"huber_delta {huber_delta}: must be positive")
    fd = prepare(data, law, exclude, weights)
    n_params = len(law.params)
    if fd.n < n_params:
        raise FitError(
            f"{fd.n} runs for {n_params} parameters of law {law.name!r}: "
            f"need at least as many runs as parameters"
        )

    obj = Objective(law, fd.X, np.log(fd.loss), huber_delta)
    grid = law.grid() if starts is None else np.atleast_2d(starts)
    optima, values, start_index = global_search(obj, fd.weights, grid)
    if not optima:
        raise FitError(f"law {law.name!r}: the objective is not finite at any starting point")
    u = optima[0]

    cov, u, cov_note = _uncertainty(obj, u, fd.weights)
    theta = law.from_u(u)
    value = float(obj.values(u[None], fd.weights)[0])
    result = _assemble(law, fd, obj, u, theta, value, cov, cov_note, reduction, ci_level)
    result.flops_per_param_token = flops_per_param_token
    result.exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    result.warnings += _search_warnings(law, grid, grid[start_index], u)

    samples = None
    if bootstrap > 0:
        samples = bootstrap_fit(obj, fd.weights, [u, *optima[1:3]], bootstrap, seed)
        result.bootstrap_samples, result.bootstrap_seed = samples, seed
        if samples is not None:
            result.ci = {
                name: percentile_interval(samples[:, j], ci_level)
                for j, name in enumerate(law.param_names)
            }
            result.ci_method = "bootstrap"
    budgets = np.geomspace(fd.X["C"].min(), fd.X["C"].max(), 7) if "C" in fd.X else None
    result.allocation = allocate(law, theta, flops_per_param_token, budgets, samples, ci_level)
    if result.allocation is not None and not np.isfinite(result.allocation.a):
        result.warnings.append("no compute-optimal allocation: the optimum lies at an extreme")

    for message in result.warnings:
        warnings.warn(f"fit {law.name}: {message}", stacklevel=2)
    return result


def _assemble(
    law: Law,
    fd: FitData,
    obj: Objective,
    u: np.ndarray,
    theta: np.ndarray,
    value: float,
    cov: np.ndarray | None,
    cov_note: str,
    reduction: str,
    ci_level: float,
) -> FitResult:
    """Build the result: standard errors, correlations, Wald intervals, diagnostics."""
    names = law.param_names
    stderr: dict[str, float | None] = dict.fromkeys(names)
    correlations: dict[str, dict[str, float]] = {}
    ci: dict[str, list[float] | None] = dict.fromkeys(names)
    ci_method = "unavailable"
    if cov is not None and np.all(np.isfinite(cov)) and np.all(np.diag(cov) >= 0):
        sd_u = np.sqrt(np.diag(cov))
        # Delta method: d(exp u) = exp(u)·du for the log-parameters.
        sd = np.where([p.log for p in law.params], theta * sd_u, sd_u)
        stderr = {n: float(s) for n, s in zip(names, sd, strict=True)}
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.outer(sd_u, sd_u)
        correlations = {
            a: {b: _json_num(corr[i, j]) for j, b in enumerate(names) if j != i}
            for i, a in enumerate(names)
        }
        z = _normal_quantile(0.5 + ci_level / 2)
        ci = {
            n: [float(t - z * s), float(t + z * s)]
            for n, t, s in zip(names, theta, sd, strict=True)
        }
        ci_method = "stderr"
    elif not cov_note:
        cov_note = "covariance not finite"

    at_bound = _at_bound(law, u)
    r = obj.law.log_predict(u[None], fd.X)[0] - obj.log_loss
    reported = value / float(fd.weights.sum()) if reduction == "mean" else value
    result = FitResult(
        law=law,
        success=bool(np.isfinite(value)),
        message="converged" if not cov_note else f"converged; {cov_note}",
        params={n: float(t) for n, t in zip(names, theta, strict=True)},
        stderr=stderr,
        correlations=correlations,
        ci=ci,
        n_points=fd.n,
        objective=reported,
        at_bound=at_bound,
        ci_level=ci_level,
        ci_method=ci_method,
        huber_delta=obj.delta,
        reduction=reduction,
        excluded=fd.excluded,
        data_range={k: [float(v.min()), float(v.max())] for k, v in fd.X.items()},
        log_residuals=r,
    )
    if cov_note:
        result.warnings.append(f"interval unavailable: {cov_note}")
    result.warnings += diagnose(result, fd)
    return result


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def _at_bound(law: Law, u: np.ndarray) -> list[str]:
    """Parameters within a hair of their optimisation-space bound."""
    lo, hi = law.u_bounds[:, 0], law.u_bounds[:, 1]
    span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    near = (np.abs(u - lo) <= 1e-6 * span) | (np.abs(hi - u) <= 1e-6 * span)
    return [p.name for p, b in zip(law.params, near, strict=True) if b]


def _search_warnings(law: Law, grid: np.ndarray, start: np.ndarray, u: np.ndarray) -> list[str]:
    """Warn when the best start sat on the grid's edge and the optimum lies beyond it."""
    out = []
    lo, hi = grid.min(0), grid.max(0)
    for j, p in enumerate(law.params):
        if lo[j] == hi[j]:
            continue
        beyond = (start[j] == lo[j] and u[j] < lo[j]) or (start[j] == hi[j] and u[j] > hi[j])
        if beyond:
            shown = "log " if p.log else ""
            out.append(
                f"best start on the edge of the grid in {shown}{p.name} ({start[j]:g}) and the "
                f"optimum beyond it ({u[j]:.4g}): widen the grid, a better optimum may lie there"
            )
    return out


def diagnose(result: FitResult, fd: FitData) -> list[str]:
    """Diagnostics of a fit, each a complete sentence (see the module's docstring)."""
    out: list[str] = []
    law, p, n_params = result.law, result.params, len(result.law.params)
    for name, value in p.items():
        is_exponent = not next(q for q in law.params if q.name == name).log
        if is_exponent and name.lower().startswith(("alpha", "beta", "gamma")) and value < 0.02:
            out.append(f"exponent {name} = {value:.4g} is under 0.02: the term is nearly flat")
    if "E" in p:
        if p["E"] < 0:
            out.append(f"irreducible loss E = {p['E']:.4g} is below 0")
        elif p["E"] > fd.loss.min():
            out.append(
                f"irreducible loss E = {p['E']:.4g} is above the smallest observed loss "
                f"{fd.loss.min():.4g}"
            )
    for name, se in result.stderr.items():
        if se is not None and p[name] != 0 and abs(se / p[name]) > 0.5:
            out.append(f"relative standard error of {name} is {abs(se / p[name]):.0%} (over 50%)")
    for a, b in (("alpha", "beta"), ("alpha_N", "alpha_D")):
        corr = result.correlations.get(a, {}).get(b)
        if corr is not None and abs(corr) > 0.9:
            out.append(f"|corr({a}, {b})| = {abs(corr):.3f} is over 0.9: exponents confounded")
    if {"N", "D"} <= set(law.variables):
        per_n = _distinct_per_group(fd.X["N"], fd.X["D"])
        if per_n < 3:
            out.append(
                f"fewer than 3 distinct D per N (median {per_n:g}; N grouped within a factor "
                f"1.25): the N and D terms are hard to tell apart"
            )
    if "N" in law.variables and fd.X["N"].max() / fd.X["N"].min() < 10:
        ratio = fd.X["N"].max() / fd.X["N"].min()
        out.append(f"N spans under one decade (max/min = {ratio:.3g})")
    if fd.n < 2 * n_params:
        out.append(f"{fd.n} runs for {n_params} parameters: fewer than twice the parameters")
    for name in result.at_bound:
        out.append(f"parameter {name} = {p[name]:.4g} sits on its bound {law.bounds[name]}")
    return out


def _distinct_per_group(n: np.ndarray, d: np.ndarray) -> float:
    """Median number of distinct D (10% apart) among runs whose N agree within a factor 1.25.

    The factor 1.25 groups model sizes that a sweep means as one size (rounded shapes, or
    values read off a figure) without merging neighbouring sizes of a factor-2 ladder.
    """
    groups = np.floor(np.log(n) / math.log(1.25))
    counts = []
    for g in np.unique(groups):
        counts.append(len(np.unique(np.floor(np.log(d[groups == g]) / math.log(1.1)))))
    return float(np.median(counts))


# ---------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_fit(
    obj: Objective,
    w: np.ndarray,
    warm_starts: list[np.ndarray],
    n_boot: int,
    seed: int,
) -> np.ndarray | None:
    """Refit on ``n_boot`` resamples of the runs; return natural parameter samples (B, P).

    Each resample is a vector of counts (multinomial) used as weights. All resamples start
    from ``warm_starts`` (the full-data optimum and the next-best optima) in one batched
    Gauss-Newton run; the best start per resample is then iterated to convergence.
    """
    rng = np.random.default_rng(seed)
    n = len(w)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    W = counts * w[None, :]
    starts = np.array(warm_starts, dtype=float)
    S = len(starts)
    U = np.repeat(starts[None, :, :], n_boot, axis=0).reshape(n_boot * S, -1)
    U, f = obj.gauss_newton(U, np.repeat(W, S, axis=0), iters=15)
    U, f = U.reshape(n_boot, S, -1), f.reshape(n_boot, S)
    best = U[np.arange(n_boot), np.argmin(f, axis=1)]

    # Continue from the best start of each resample until its objective stops falling: on
    # the Chinchilla points this matches an L-BFGS-B polish to 1e-4 in log-parameters.
    samples, _ = obj.gauss_newton(best, W, iters=300)
    ok = np.all(np.isfinite(samples), axis=1)
    if ok.sum() < 10:
        return None
    return obj.law.from_u(samples[ok])


# ---------------------------------------------------------------------------------------------
# Prediction


def predict(
    fit: FitResult,
    *,
    params: float | None = None,
    tokens: float | None = None,
    compute: float | None = None,
    unique_tokens: float | None = None,
    level: float | None = None,
) -> dict:
    """Predict the loss at a size and data amount, or at a budget (compute-optimal).

    Parameters
    ----------
    fit
        A fitted law.
    params, tokens
        N and D; with ``compute`` alone, the compute-optimal N and D are used.
    compute
        FLOP budget C; with one of ``params``/``tokens`` the other is C/(k·N) or C/(k·D).
    unique_tokens
        Unique tokens (data-constrained law only; defaults to ``tokens``).
    level
        Interval level (the fit's by default).

    Returns
    -------
    dict
        DESIGN.md's predict JSON: ``compute``, ``params``, ``tokens``, ``loss``,
        ``interval`` ([low, high] or None) and ``interval_reason`` when None.
    """
    law, k = fit.law, fit.flops_per_param_token
    level = fit.ci_level if level is None else level
    given = {"params": params, "tokens": tokens, "compute": compute}
    if all(v is None for v in given.values()):
        raise FitError("predict: give --compute, or --params and --tokens")
    for name, value in given.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FitError(f"predict: --{name} {value} must be a positive number")

    if params is not None and tokens is not None and compute is not None:
        implied = k * params * tokens
        if abs(implied / compute - 1) > 0.01:
            raise FitError(
                f"predict: --compute {compute:.4g} contradicts --params and --tokens, which "
                f"make C = {k:g}·N·D = {implied:.4g}; give --compute alone, or --params and "
                "--tokens"
            )

    theta = fit.theta[None, :]
    samples = fit.bootstrap_samples
    optimal = compute is not None and params is None and tokens is None
    if optimal and {"N", "D"} <= set(law.variables):
        n_opt, loss = optimal_split(law, theta, np.array([compute]), k)
        params, tokens = float(n_opt[0, 0]), float(compute / (k * n_opt[0, 0]))
        value = float(loss[0, 0])
        boot = (
            optimal_split(law, samples, np.array([compute]), k)[1][:, 0] if _has(samples) else None
        )
    else:
        if compute is None and "C" in law.variables and (params is None or tokens is None):
            raise FitError(f"predict: law {law.name!r} needs --compute, or --params and --tokens")
        if compute is None and params is not None and tokens is not None:
            compute = k * params * tokens
        elif params is None and compute is not None and tokens is not None:
            params = compute / (k * tokens)
        elif tokens is None and compute is not None and params is not None:
            tokens = compute / (k * params)
        supplied = {"N": params, "D": tokens, "C": compute}
        missing = [VARIABLES[v] for v in law.variables if v != "U" and supplied[v] is None]
        if missing:
            raise FitError(f"predict: law {law.name!r} needs --{' and --'.join(missing)}")
        X = {
            "N": np.array([params or np.nan]),
            "D": np.array([tokens or np.nan]),
            "C": np.array([compute or np.nan]),
            "U": np.array([unique_tokens or tokens or np.nan]),
        }
        value = float(law.predict(theta, X)[0, 0])
        boot = law.predict(samples, X)[:, 0] if _has(samples) else None

    interval, reason = None, None
    if boot is not None:
        interval = percentile_interval(boot, level)
        reason = None if interval else "too few finite bootstrap predictions"
    else:
        reason = "interval unavailable: the fit has no bootstrap samples (fit with --bootstrap B)"
    out = {
        "compute": _json_num(compute),
        "params": _json_num(params),
        "tokens": _json_num(tokens),
        "loss": _json_num(value),
        "interval": interval,
        "level": level,
        "law": law.name,
    }
    if interval is None:
        out["interval_reason"] = reason
    if optimal:
        out["compute_optimal"] = True
    return out


def _has(samples: np.ndarray | None) -> bool:
    return samples is not None and len(samples) > 0


def predict_arrays(
    fit: FitResult, frame: pd.DataFrame, level: float | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted loss for each row of ``frame`` and, with bootstrap samples, (n, 2) intervals."""
    X = {v: frame[c].to_numpy(dtype=float) for v, c in VARIABLES.items() if c in frame.columns}
    pred = fit.law.predict(fit.theta[None, :], X)[0]
    if not _has(fit.bootstrap_samples):
        return pred, None
    boot = fit.law.predict(fit.bootstrap_samples, X)
    level = fit.ci_level if level is None else level
    tail = 50 * (1 - level)
    return pred, np.nanpercentile(boot, [tail, 100 - tail], axis=0).T


def allocation_table(fit: FitResult, budgets: np.ndarray) -> pd.DataFrame:
    """Compute-optimal N, D and loss at each budget, with bootstrap intervals when present."""
    rows = [predict(fit, compute=float(c)) for c in budgets]
    return pd.DataFrame(rows)


__all__ = [
    "DEFAULT_HUBER_DELTA",
    "FitData",
    "FitResult",
    "Objective",
    "allocation_samples",
    "allocation_table",
    "bootstrap_fit",
    "diagnose",
    "fit",
    "huber",
    "predict",
    "predict_arrays",
    "prepare",
]

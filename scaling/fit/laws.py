"""Scaling-law forms: parameters, bounds, starting grids, vectorised evaluation.

Every law predicts the loss from a dict of data arrays ``X`` with keys ``N`` (parameters),
``D`` (tokens), ``C`` (compute) and, for the data-constrained form, ``U`` (unique tokens).
Parameter values come as an array ``theta`` of shape (K, P) for K parameter sets at once, so
that a grid of thousands of starting points is one numpy evaluation of shape (K, n).

Optimisation happens in "u-space": positive scale parameters (E, A, B, ...) as their
logarithm, exponents as they are. `Law.to_u` and `Law.from_u` convert.
"""

from __future__ import annotations

import ast
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from scaling.errors import FitError

#: Variables a formula may use and the fit-table column each one reads.
VARIABLES = {"N": "params", "D": "tokens", "C": "compute", "U": "unique_tokens"}

# Hoffmann et al. 2022 (Chinchilla), appendix D.2: L-BFGS from a grid of
# alpha, beta in {0, 0.5, ..., 2}, e = log E in {-1, -0.5, ..., 1}, a = log A and
# b = log B in {0, 5, ..., 25}: 5 * 5 * 5 * 6 * 6 = 4,500 starting points.
HOFFMANN_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
HOFFMANN_LOG_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
HOFFMANN_LOG_COEF = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)

# Bounds in u-space for the built-in forms. Wide enough never to bind on real language-model
# data (fitted exponents 0.05..1, log coefficients 0..30), narrow enough that exp() cannot
# overflow; a fit that reaches one is reported with a warning.
LOG_E_BOUNDS = (-20.0, 10.0)
LOG_COEF_BOUNDS = (-30.0, 100.0)
EXPONENT_BOUNDS = (0.0, 5.0)


@dataclass(frozen=True)
class Param:
    """One law parameter.

    Attributes
    ----------
    name
        Name in the formula and in the fit JSON.
    low, high
        Bounds on the value (natural space); ``-inf``/``inf`` for none.
    starts
        Starting values (natural space) that the global search grid combines.
    log
        Optimise ``log(value)`` instead of the value (for positive scale parameters).
    """

    name: str
    low: float
    high: float
    starts: tuple[float, ...]
    log: bool = False

    @property
    def u_bounds(self) -> tuple[float, float]:
        """Bounds in optimisation space."""
        if not self.log:
            return (self.low, self.high)
        low = math.log(self.low) if self.low > 0 else LOG_COEF_BOUNDS[0]
        high = math.log(self.high) if math.isfinite(self.high) else LOG_COEF_BOUNDS[1]
        return (low, high)

    def to_dict(self) -> dict:
        """JSON-ready description (infinite bounds as None)."""
        low = self.low if math.isfinite(self.low) else None
        high = self.high if math.isfinite(self.high) else None
        return {"low": low, "high": high, "starts": list(self.starts), "log": self.log}


def _log_param(name: str, log_bounds: tuple[float, float], log_starts: tuple[float, ...]) -> Param:
    """A positive parameter optimised as its logarithm."""
    return Param(
        name,
        math.exp(log_bounds[0]),
        math.exp(log_bounds[1]),
        tuple(math.exp(s) for s in log_starts),
        log=True,
    )


def _exponent(name: str) -> Param:
    """An exponent with the Hoffmann starting values."""
    return Param(name, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[1], HOFFMANN_EXPONENTS)


class Law:
    """A scaling-law form. Subclasses define `params`, `predict` and optionally more.

    Attributes
    ----------
    name
        Short name used on the command line and in the fit JSON.
    formula
        The formula in plain text.
    params
        The parameters, in the order of the columns of ``theta``.
    variables
        Data variables the law reads (keys of ``X``).
    """

    name: str = ""
    formula: str = ""
    params: tuple[Param, ...] = ()
    variables: tuple[str, ...] = ("N", "D")

    @property
    def param_names(self) -> list[str]:
        """Parameter names in column order."""
        return [p.name for p in self.params]

    @property
    def bounds(self) -> dict[str, tuple[float, float]]:
        """Bounds on each parameter in natural space."""
        return {p.name: (p.low, p.high) for p in self.params}

    @property
    def u_bounds(self) -> np.ndarray:
        """Bounds in optimisation space, shape (P, 2)."""
        return np.array([p.u_bounds for p in self.params], dtype=float)

    def to_u(self, theta: np.ndarray) -> np.ndarray:
        """Natural parameters (..., P) to optimisation space."""
        theta = np.asarray(theta, dtype=float)
        logs = np.array([p.log for p in self.params])
        with np.errstate(divide="ignore"):
            return np.where(logs, np.log(np.maximum(theta, 1e-300)), theta)

    def from_u(self, u: np.ndarray) -> np.ndarray:
        """Optimisation space (..., P) to natural parameters."""
        u = np.asarray(u, dtype=float)
        logs = np.array([p.log for p in self.params])
        return np.where(logs, np.exp(np.clip(u, -700, 700)), u)

    def grid(self) -> np.ndarray:
        """Starting points for the global search in optimisation space, shape (K, P)."""
        axes = [self.to_u_axis(p) for p in self.params]
        return np.array(list(itertools.product(*axes)), dtype=float)

    @staticmethod
    def to_u_axis(p: Param) -> list[float]:
        """One parameter's starting values in optimisation space."""
        return [math.log(s) if p.log else s for s in p.starts]

    def predict(self, theta: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        """Loss for parameter sets ``theta`` (K, P) at data ``X``: shape (K, n)."""
        raise NotImplementedError

    def log_predict(self, u: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        """log loss for optimisation-space parameters ``u`` (K, P): shape (K, n)."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            pred = self.predict(self.from_u(u), X)
            return np.where(pred > 0, np.log(np.where(pred > 0, pred, 1.0)), np.nan)

    def log_predict_jac(
        self, u: np.ndarray, X: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """log loss (K, n) and its Jacobian in optimisation space (K, P, n).

        The default uses central differences; built-in forms override it analytically.
        """
        u = np.asarray(u, dtype=float)
        base = self.log_predict(u, X)
        jac = np.empty((base.shape[0], u.shape[-1], base.shape[1]))
        for j in range(u.shape[-1]):
            h = 1e-6 * np.maximum(1.0, np.abs(u[:, j]))
            up, down = u.copy(), u.copy()
            up[:, j] += h
            down[:, j] -= h
            diff = self.log_predict(up, X) - self.log_predict(down, X)
            jac[:, j, :] = diff / (2 * h[:, None])
        return base, jac

    def closed_form_allocation(self, theta: np.ndarray, k: float) -> tuple | None:
        """Closed-form compute-optimal allocation, if the form has one.

        Returns ``(a, b, coef_N, coef_D)`` arrays for ``theta`` (K, P) with
        N_opt = coef_N·C^a and D_opt = coef_D·C^b under C = k·N·D; None when no closed form.
        """
        return None

    def to_dict(self) -> dict:
        """JSON-ready description from which `law_from_dict` rebuilds the law."""
        return {"name": self.name}


@dataclass(frozen=True)
class _Term:
    """One power-law term coef·X^-exponent of the additive family."""

    coef: str
    exponent: str
    variable: str  # "N", "D" or "C"


class AdditiveLaw(Law):
    """L = E + Σ coef·X^-exponent over power-law terms in N, D and C (E optional).

    Parameters
    ----------
    name
        Law name.
    terms
        The power-law terms.
    with_e
        Whether the irreducible loss E is part of the law.
    """

    def __init__(self, name: str, terms: list[_Term], with_e: bool = True) -> None:
        self.name = name
        self.terms = tuple(terms)
        self.with_e = with_e
        params: list[Param] = []
        if with_e:
            params.append(_log_param("E", LOG_E_BOUNDS, HOFFMANN_LOG_E))
        for t in self.terms:
            params.append(_log_param(t.coef, LOG_COEF_BOUNDS, HOFFMANN_LOG_COEF))
            params.append(_exponent(t.exponent))
        self.params = tuple(params)
        self.variables = tuple(dict.fromkeys(t.variable for t in self.terms))
        pieces = ["E"] if with_e else []
        pieces += [f"{t.coef}*{t.variable}**-{t.exponent}" for t in self.terms]
        self.formula = " + ".join(pieces)

    def grid(self) -> np.ndarray:
        """Hoffmann's grid; three-term forms use a coarser one to stay near 5,000 starts."""
        if len(self.terms) <= 2:
            return super().grid()
        axes = [list(HOFFMANN_LOG_E)] if self.with_e else []
        for _ in self.terms:
            axes += [[0.0, 10.0, 20.0], [0.0, 0.5, 1.0]]
        if self.with_e:
            axes[0] = [-1.0, 0.0, 1.0]
        return np.array(list(itertools.product(*axes)), dtype=float)

    def _terms(self, u: np.ndarray, X: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
        """E (K, 1) and each term's values (K, n) from optimisation-space ``u``."""
        u = np.atleast_2d(u)
        offset = 1 if self.with_e else 0
        e = np.exp(u[:, :1]) if self.with_e else np.zeros((len(u), 1))
        values = []
        for i, t in enumerate(self.terms):
            log_x = np.log(X[t.variable])[None, :]
            log_coef, exponent = u[:, offset + 2 * i, None], u[:, offset + 2 * i + 1, None]
            values.append(np.exp(np.clip(log_coef - exponent * log_x, -700, 700)))
        return e, values

    def predict(self, theta: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        e, values = self._terms(self.to_u(np.atleast_2d(theta)), X)
        return e + sum(values)

    def log_predict(self, u: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        e, values = self._terms(u, X)
        return np.log(e + sum(values))

    def log_predict_jac(
        self, u: np.ndarray, X: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        u = np.atleast_2d(u)
        e, values = self._terms(u, X)
        total = e + sum(values)
        jac = np.empty((total.shape[0], u.shape[1], total.shape[1]))
        inv = 1.0 / total
        offset = 1 if self.with_e else 0
        if self.with_e:
            np.multiply(e, inv, out=jac[:, 0, :])
        for i, (t, v) in enumerate(zip(self.terms, values, strict=True)):
            share = np.multiply(v, inv, out=jac[:, offset + 2 * i, :])
            np.multiply(share, -np.log(X[t.variable])[None, :], out=jac[:, offset + 2 * i + 1, :])
        return np.log(total), jac

    def closed_form_allocation(self, theta: np.ndarray, k: float) -> tuple | None:
        """Chinchilla's closed form (Hoffmann et al. 2022, eq. 4) for E + A/N^α + B/D^β.

        Minimising A·N^-α + B·(C/(kN))^-β over N gives N_opt = G·(C/k)^a and
        D_opt = (C/k)^b / G with G = (αA/(βB))^(1/(α+β)), a = β/(α+β), b = α/(α+β).
        """
        if [t.variable for t in self.terms] != ["N", "D"]:
            return None
        theta = np.atleast_2d(theta)
        offset = 1 if self.with_e else 0
        coef_a, alpha, coef_b, beta = (theta[:, offset + j] for j in range(4))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            a = beta / (alpha + beta)
            b = alpha / (alpha + beta)
            g = (alpha * coef_a / (beta * coef_b)) ** (1.0 / (alpha + beta))
            return a, b, g * k**-a, k**-b / g

    def to_dict(self) -> dict:
        return {"name": self.name}


class KaplanLaw(Law):
    """Kaplan et al. 2020, eq. 1.5: L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D."""

    name = "kaplan"
    formula = "((N_c/N)**(alpha_N/alpha_D) + D_c/D)**alpha_D"
    variables = ("N", "D")

    def __init__(self) -> None:
        # Starting values around Kaplan et al. 2020, eq. 1.5 and table 2 (N_c = 6.4e13,
        # D_c = 1.8e13, α_N = 0.076, α_D = 0.095, fitted on WebText2 with N non-embedding).
        self.params = (
            _log_param("N_c", (-10.0, 100.0), (20.0, 30.0, 40.0)),
            Param("alpha_N", 1e-4, 5.0, (0.05, 0.1, 0.3)),
            _log_param("D_c", (-10.0, 100.0), (20.0, 30.0, 40.0)),
            Param("alpha_D", 1e-4, 5.0, (0.05, 0.1, 0.3)),
        )

    def predict(self, theta: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        return np.exp(self.log_predict(self.to_u(np.atleast_2d(theta)), X))

    def log_predict(self, u: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        u = np.atleast_2d(u)
        log_nc, alpha_n, log_dc, alpha_d = (u[:, j, None] for j in range(4))
        first = (alpha_n / alpha_d) * (log_nc - np.log(X["N"])[None, :])
        second = log_dc - np.log(X["D"])[None, :]
        return alpha_d * np.logaddexp(first, second)


class DataConstrainedLaw(Law):
    """Muennighoff et al. 2023, eq. 5, data term only: L = E + A/N^α + B/D'^β.

    D' = U + U·R*·(1 − exp(−R/R*)) with repetitions R = D/U − 1 and U the unique tokens:
    repeated tokens are worth less and less, with R* the decay constant.

    NOTE: the paper also discounts excess parameters (N' with R_N*); this form keeps N as it
    is, which matches the paper when models are not far larger than the unique data allows.
    """

    name = "muennighoff"
    formula = "E + A*N**-alpha + B*Dp**-beta, Dp = U + U*R_star*(1 - exp(-(D/U - 1)/R_star))"
    variables = ("N", "D", "U")

    def __init__(self) -> None:
        # R* starts around Muennighoff et al. 2023, eq. 5 fit: R_D* = 15.4.
        self.params = (
            _log_param("E", LOG_E_BOUNDS, HOFFMANN_LOG_E[::2]),
            _log_param("A", LOG_COEF_BOUNDS, (0.0, 10.0, 20.0)),
            _exponent("alpha"),
            _log_param("B", LOG_COEF_BOUNDS, (0.0, 10.0, 20.0)),
            _exponent("beta"),
            _log_param("R_star", (math.log(0.01), math.log(1e4)), (1.0, 2.7, 4.0)),
        )

    def grid(self) -> np.ndarray:
        axes = [self.to_u_axis(p) for p in self.params]
        axes[2] = axes[4] = [0.25, 0.5, 1.0]
        return np.array(list(itertools.product(*axes)), dtype=float)

    def predict(self, theta: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        theta = np.atleast_2d(theta)
        e, a, alpha, b, beta, r_star = (theta[:, j, None] for j in range(6))
        unique = X["U"][None, :]
        repeats = np.maximum(X["D"][None, :] / unique - 1.0, 0.0)
        d_eff = unique + unique * r_star * (1.0 - np.exp(-repeats / r_star))
        return e + a * X["N"][None, :] ** -alpha + b * d_eff**-beta


# Names allowed in a custom formula besides variables and parameters.
_FUNCTIONS = {"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "log10": np.log10, "abs": np.abs}
_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Pow,
    ast.USub,
    ast.UAdd,
)

#: Default range of a custom-formula parameter with no ``--param``: positive, started at
#: 0.1, 1, 10 and 1000 (a guess that covers exponents and coefficients alike).
DEFAULT_CUSTOM_PARAM = Param("", 0.0, math.inf, (0.1, 1.0, 10.0, 1000.0), log=True)


def parse_param_range(text: str) -> Param:
    """Parse ``NAME=LOW:HIGH`` or ``NAME=LOW:HIGH:S1,S2,...`` into a `Param`.

    Bounds may be ``-inf``/``inf``. Without explicit starts, four starts are spread over the
    bounds (log-spaced when LOW > 0 and HIGH/LOW > 100). Parameters with LOW ≥ 0 and an
    infinite HIGH are optimised as logarithms.

    Parameters
    ----------
    text
        The range, e.g. ``alpha=0:2`` or ``A=0:inf:1,100,1e4``.

    Returns
    -------
    Param
    """
    name, sep, rest = text.partition("=")
    pieces = rest.split(":")
    name = name.strip()
    if not sep or not name.isidentifier() or len(pieces) not in (2, 3):
        raise FitError(f"--param {text!r}: expected NAME=LOW:HIGH or NAME=LOW:HIGH:S1,S2,...")
    try:
        low, high = float(pieces[0]), float(pieces[1])
        starts = [float(s) for s in pieces[2].split(",")] if len(pieces) == 3 else []
    except ValueError as exc:
        raise FitError(f"--param {text!r}: bounds and starts must be numbers ({exc})") from exc
    if not low < high:
        raise FitError(f"--param {text!r}: LOW ({low}) must be below HIGH ({high})")
    log = low >= 0 and math.isinf(high)
    if not starts:
        lo = low if math.isfinite(low) else -10.0
        hi = high if math.isfinite(high) else max(lo, 0.0) + 1e4
        if lo > 0 and hi / lo > 100 or log:
            starts = list(np.geomspace(max(lo, 1e-3), hi, 4))
        else:
            starts = list(lo + (hi - lo) * np.array([0.1, 0.35, 0.65, 0.9]))
    outside = [s for s in starts if not low <= s <= high]
    if outside:
        raise FitError(f"--param {text!r}: starts {outside} lie outside [{low}, {high}]")
    return Param(name, low, high, tuple(float(s) for s in starts), log=log)


class CustomLaw(Law):
    """A user's formula over N, D, C (and U) with named parameters, evaluated with numpy.

    Parameters
    ----------
    formula
        An expression such as ``E + A*N**-alpha + B*D**-beta`` (``**`` or ``^`` for powers;
        ``exp``, ``log``, ``log10``, ``sqrt``, ``abs`` allowed).
    ranges
        Parameter ranges; parameters without one get `DEFAULT_CUSTOM_PARAM`'s.
    """

    name = "custom"

    def __init__(self, formula: str, ranges: list[Param] | None = None) -> None:
        self.formula = formula.replace("^", "**")
        try:
            tree = ast.parse(self.formula, mode="eval")
        except SyntaxError as exc:
            raise FitError(f"--law {formula!r}: not a formula ({exc.msg})") from exc
        for node in ast.walk(tree):
            if not isinstance(node, _NODES):
                raise FitError(
                    f"--law {formula!r}: {type(node).__name__} is not allowed; use numbers, "
                    f"+ - * / **, N D C U, parameters and {', '.join(_FUNCTIONS)}"
                )
            if isinstance(node, ast.Call) and not (
                isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            ):
                raise FitError(f"--law {formula!r}: only {', '.join(_FUNCTIONS)} may be called")
        names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
        names = list(dict.fromkeys(n for n in names if n not in _FUNCTIONS))
        self.variables = tuple(n for n in names if n in VARIABLES)
        if not self.variables:
            raise FitError(f"--law {formula!r}: the formula uses none of N, D, C, U")

        by_name = {p.name: p for p in ranges or []}
        param_names = [n for n in names if n not in VARIABLES]
        unknown = sorted(set(by_name) - set(param_names))
        if unknown:
            raise FitError(
                f"--param {', '.join(unknown)}: not in the formula {formula!r} "
                f"(its parameters: {', '.join(param_names)})"
            )
        default = DEFAULT_CUSTOM_PARAM
        self.params = tuple(
            by_name.get(n) or Param(n, default.low, default.high, default.starts, default.log)
            for n in param_names
        )
        self._code = compile(tree, "<law>", "eval")

    def grid(self) -> np.ndarray:
        grid = super().grid()
        if len(grid) > 20000:
            # Keep a deterministic spread-out subset: a full product can explode.
            grid = grid[np.linspace(0, len(grid) - 1, 20000).astype(int)]
        return grid

    def predict(self, theta: np.ndarray, X: dict[str, np.ndarray]) -> np.ndarray:
        theta = np.atleast_2d(theta)
        namespace: dict = dict(_FUNCTIONS)
        namespace.update({v: X[v][None, :] for v in self.variables})
        namespace.update({p.name: theta[:, j, None] for j, p in enumerate(self.params)})
        with np.errstate(all="ignore"):
            value = eval(self._code, {"__builtins__": {}}, namespace)  # noqa: S307 (AST-checked)
        n = len(next(iter(X.values())))
        return np.broadcast_to(np.asarray(value, dtype=float), (len(theta), n))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "formula": self.formula,
            "params": {p.name: p.to_dict() for p in self.params},
        }


def _additive(name: str) -> AdditiveLaw:
    """Build the additive-family law named like ``nd``, ``ndc``, ``n``, ``nd-noE``."""
    letters, _, suffix = name.partition("-")
    if suffix not in ("", "noE") or not letters or set(letters) - set("ndc"):
        raise KeyError(name)
    if len(set(letters)) != len(letters):
        raise KeyError(name)
    spec = {"n": ("a", "alpha", "N"), "d": ("b", "beta", "D"), "c": ("c", "gamma", "C")}
    terms = [_Term(*spec[x]) for x in "ndc" if x in letters]
    return AdditiveLaw(name, terms, with_e=suffix != "noE")


def law_names() -> list[str]:
    """Names of the built-in laws (the additive family also takes any subset of n, d, c)."""
    return ["chinchilla", "kaplan", "compute", "muennighoff", "ndc", "nd", "n", "d", "c", "nd-noE"]


def get_law(name: str, ranges: list[Param] | None = None) -> Law:
    """Return the law with this name, or a custom law when ``name`` is a formula.

    Parameters
    ----------
    name
        A built-in name (see `law_names`) or a formula over N, D, C, U.
    ranges
        Parameter ranges for a custom formula.

    Returns
    -------
    Law
    """
    if name == "chinchilla":
        return AdditiveLaw("chinchilla", [_Term("A", "alpha", "N"), _Term("B", "beta", "D")])
    if name == "compute":
        return AdditiveLaw("compute", [_Term("c", "gamma", "C")])
    if name == "kaplan":
        return KaplanLaw()
    if name == "muennighoff":
        return DataConstrainedLaw()
    try:
        return _additive(name)
    except KeyError:
        pass
    if name.isidentifier() or "-" in name and not any(c in name for c in "*+/()"):
        raise FitError(
            f"--law {name!r}: unknown law; valid: {', '.join(law_names())}, any subset of "
            f"n, d, c with an optional -noE suffix, or a formula such as "
            f"'E + A*N**-alpha + B*D**-beta'"
        )
    if ranges and any(p.name in VARIABLES for p in ranges):
        raise FitError("--param: N, D, C and U are data variables, not parameters")
    return CustomLaw(name, ranges)


def law_from_dict(spec: dict) -> Law:
    """Rebuild a law from `Law.to_dict` output (as stored in a fit JSON)."""
    if spec.get("name") == "custom":
        ranges = [
            Param(
                name,
                -math.inf if p["low"] is None else float(p["low"]),
                math.inf if p["high"] is None else float(p["high"]),
                tuple(p["starts"]),
                bool(p["log"]),
            )
            for name, p in spec["params"].items()
        ]
        return CustomLaw(spec["formula"], ranges)
    return get_law(spec["name"])


@dataclass
class LawChoice:
    """A law name or formula plus ``--param`` ranges, as the CLI collects them."""

    law: str = "chinchilla"
    param_ranges: list[str] = field(default_factory=list)

    def build(self) -> Law:
        """Parse the ranges and build the law."""
        return get_law(self.law, [parse_param_range(t) for t in self.param_ranges])

"""The fitting commands: ``scaling fit``, ``predict``, ``allocations`` and ``compare``.

The main group (``scaling.cli``) registers every command in `COMMANDS`. With ``--json`` a
command prints exactly one JSON object on stdout; logs go to stderr. User mistakes raise
`scaling.errors.ScalingError` subclasses, which the main group prints as one line.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import click
import numpy as np

from scaling.errors import FitError
from scaling.fit.laws import Law, get_law, parse_param_range
from scaling.fit.table import DEFAULT_FLOPS_PER_PARAM_TOKEN, load_source, parse_columns

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Shared options


def _law_options(f):
    f = click.option(
        "--param",
        "param_ranges",
        multiple=True,
        metavar="NAME=LOW:HIGH[:S1,S2,...]",
        help="Bounds (and starting values) of a parameter of a custom --law formula.",
    )(f)
    return click.option(
        "--law",
        default="chinchilla",
        show_default=True,
        help="Law name (chinchilla, kaplan, compute, muennighoff, ndc, nd, n, nd-noE, ...) "
        "or a formula over N, D, C such as 'E + A*N**-alpha + B*D**-beta'.",
    )(f)


def _source_options(f):
    f = click.option(
        "--col",
        "columns",
        multiple=True,
        metavar="FIELD=COLUMN",
        help="Map a table column to a field, e.g. --col params='Model Size'.",
    )(f)
    return click.option(
        "--flops-factor",
        type=float,
        default=DEFAULT_FLOPS_PER_PARAM_TOKEN,
        show_default=True,
        help="FLOP convention k in C = k·N·D (tokens derived as C/(kN)).",
    )(f)


def _fit_options(f):
    f = click.option(
        "--bootstrap", type=click.IntRange(min=0), default=0, show_default=True, help="Resamples."
    )(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")(f)
    f = click.option(
        "--huber-delta", type=float, default=1e-3, show_default=True, help="Huber threshold."
    )(f)
    f = click.option(
        "--exclude",
        multiple=True,
        metavar="EXPR",
        help="Leave out runs matching a pandas expression, e.g. 'params < 1e8'.",
    )(f)
    return click.option(
        "--ci-level", type=float, default=0.95, show_default=True, help="Interval level."
    )(f)


def _law(law: str, param_ranges: tuple[str, ...]) -> Law:
    return get_law(law, [parse_param_range(t) for t in param_ranges])


def _load(source: str, columns: tuple[str, ...], k: float):
    return load_source(source, parse_columns(columns), k)


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, allow_nan=False, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _interval(ci: list[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "n/a"


def _run_fit(source, law, param_ranges, columns, flops_factor, **kwargs):
    """Load a source and fit a law, collecting fit warnings (they are in the result)."""
    from scaling.fit.fitter import fit

    data = _load(source, columns, flops_factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(
            data,
            _law(law, param_ranges),
            flops_per_param_token=flops_factor,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------
# scaling fit


@click.command("fit")
@click.argument("source")
@_law_options
@_source_options
@_fit_options
@click.option(
    "--approach",
    type=click.Choice(["1", "2", "3"]),
    default="3",
    show_default=True,
    help="Hoffmann et al. approach: 1 training-curve envelope, 2 IsoFLOP parabolas, "
    "3 parametric law.",
)
@click.option("--curves", default=None, help="Training-curves table for approach 1.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the fit JSON here.")
def fit_cmd(
    source, law, param_ranges, columns, flops_factor, bootstrap, seed, huber_delta, exclude,
    ci_level, approach, curves, as_json, out,
):  # fmt: skip
    """Fit a scaling law to SOURCE (a results folder or a CSV/Parquet table)."""
    if approach != "3":
        from scaling.fit.approaches import approach_allocation

        data = _load(source, columns, flops_factor)
        alloc = approach_allocation(
            int(approach), data, source=source, curves=curves, k=flops_factor,
            bootstrap=bootstrap, seed=seed, level=ci_level,
        )  # fmt: skip
        payload = {"approach": int(approach), "allocation": alloc.to_dict()}
        if out:
            Path(out).write_text(json.dumps(payload, indent=1) + "\n")
        if as_json:
            _emit_json(payload)
        else:
            click.echo(_allocation_text(f"approach {approach}", alloc))
        return

    result = _run_fit(
        source, law, param_ranges, columns, flops_factor, bootstrap=bootstrap, seed=seed,
        huber_delta=huber_delta, exclude=list(exclude), ci_level=ci_level,
    )  # fmt: skip
    for message in result.warnings:
        logger.warning("fit %s: %s", result.law.name, message)
    if out:
        result.save(out)
        logger.info("wrote %s", out)
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(fit_text(result))


def fit_text(result) -> str:
    """Human-readable summary of a `FitResult`."""
    lines = [
        f"law      {result.law.name}: L = {result.law.formula}",
        f"points   {result.n_points}"
        + (f" ({len(result.excluded)} excluded)" if result.excluded else ""),
        f"objective {result.objective:.6g} (Huber δ={result.huber_delta:g}, {result.reduction})",
        f"{'param':>10} {'value':>12} {'stderr':>10}  {result.ci_level:.0%} interval "
        f"({result.ci_method})",
    ]
    for name, value in result.params.items():
        ci = result.ci.get(name) if result.ci else None
        lines.append(
            f"{name:>10} {_fmt(value, 6):>12} {_fmt(result.stderr.get(name)):>10}  {_interval(ci)}"
        )
    if result.allocation:
        lines.append(_allocation_text("allocation", result.allocation))
    for message in result.warnings:
        lines.append(f"warning: {message}")
    return "\n".join(lines)


def _allocation_text(title: str, alloc) -> str:
    ci = alloc.ci or {}
    return (
        f"{title}: N_opt = {_fmt(alloc.coef_n)}·C^{_fmt(alloc.a)} {_interval(ci.get('a'))}, "
        f"D_opt = {_fmt(alloc.coef_d)}·C^{_fmt(alloc.b)} {_interval(ci.get('b'))} "
        f"({alloc.method}, C = {alloc.flops_per_param_token:g}·N·D)"
    )


# ---------------------------------------------------------------------------------------------
# scaling predict


@click.command("predict")
@click.argument("source_or_fit")
@click.option("--compute", type=float, help="FLOP budget: compute-optimal N, D and loss.")
@click.option("--params", type=float, help="Parameters N (with --tokens).")
@click.option("--tokens", type=float, help="Tokens D (with --params).")
@click.option("--unique-tokens", type=float, help="Unique tokens (data-constrained law).")
@_law_options
@_source_options
@click.option(
    "--bootstrap", type=click.IntRange(min=0), default=0, show_default=True, help="Resamples (fit)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def predict_cmd(
    source_or_fit, compute, params, tokens, unique_tokens, law, param_ranges, columns,
    flops_factor, bootstrap, seed, as_json,
):  # fmt: skip
    """Predict the loss from a fit JSON, or from SOURCE fitted on the fly."""
    from scaling.fit.fitter import FitResult, predict

    if compute is None and (params is None or tokens is None):
        raise FitError("predict: give --compute C, or both --params N and --tokens D")
    if source_or_fit.endswith(".json"):
        result = FitResult.load(source_or_fit)
    else:
        result = _run_fit(
            source_or_fit, law, param_ranges, columns, flops_factor, bootstrap=bootstrap,
            seed=seed,
        )  # fmt: skip
    out = predict(
        result, params=params, tokens=tokens, compute=compute, unique_tokens=unique_tokens
    )
    if as_json:
        _emit_json(out)
        return
    level = out["level"]
    if out["interval"]:
        interval = f"{level:.0%} interval {_interval(out['interval'])}"
    else:
        interval = f"({out.get('interval_reason')})"
    click.echo(
        f"law {out['law']}: C = {_fmt(out['compute'])}, N = {_fmt(out['params'])}, "
        f"D = {_fmt(out['tokens'])}\nloss {_fmt(out['loss'], 6)}  {interval}"
    )


# ---------------------------------------------------------------------------------------------
# scaling allocations and scaling compare


@click.command("allocations")
@click.argument("source")
@_law_options
@_source_options
@click.option("--curves", default=None, help="Training-curves table for approach 1.")
@click.option(
    "--bootstrap", type=click.IntRange(min=0), default=200, show_default=True, help="Resamples."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ci-level", type=float, default=0.95, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def allocations_cmd(
    source, law, param_ranges, columns, flops_factor, curves, bootstrap, seed, ci_level, as_json
):  # fmt: skip
    """Compute-optimal allocation by Hoffmann et al.'s approaches 1, 2 and 3 side by side."""
    from scaling.fit.approaches import all_approaches

    data = _load(source, columns, flops_factor)
    table = all_approaches(
        data, law=_law(law, param_ranges), source=source, curves=curves, k=flops_factor,
        bootstrap=bootstrap, seed=seed, level=ci_level,
    )  # fmt: skip
    if as_json:
        _emit_json({name: entry for name, entry in table.items()})
        return
    click.echo(f"{'approach':<28} {'a (N_opt ∝ C^a)':<30} {'b (D_opt ∝ C^b)':<30}")
    for name, entry in table.items():
        if entry.get("allocation") is None:
            click.echo(f"{name:<28} unavailable: {entry.get('reason')}")
            continue
        alloc = entry["allocation"]
        ci = alloc.get("ci") or {}
        a = f"{_fmt(alloc['a'])} {_interval(ci.get('a'))}"
        b = f"{_fmt(alloc['b'])} {_interval(ci.get('b'))}"
        click.echo(f"{name:<28} {a:<30} {b:<30}")


@click.command("compare")
@click.argument("source")
@click.option("--law", "laws", multiple=True, help="Laws to compare (repeat); default: several.")
@click.option("--param", "param_ranges", multiple=True, help="Ranges for custom formulas.")
@_source_options
@click.option(
    "--holdout",
    type=click.Choice(["compute", "params"]),
    default="compute",
    show_default=True,
    help="Hold out the runs at the largest budget or the largest N.",
)
@click.option(
    "--bootstrap", type=click.IntRange(min=0), default=100, show_default=True, help="Resamples."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def compare_cmd(
    source, laws, param_ranges, columns, flops_factor, holdout, bootstrap, seed, as_json
):  # fmt: skip
    """Compare law forms by AIC/BIC and by extrapolation to held-out runs."""
    from scaling.fit.compare import compare_laws

    data = _load(source, columns, flops_factor)
    ranges = [parse_param_range(t) for t in param_ranges]
    chosen = [get_law(name, ranges) for name in (laws or ("chinchilla", "ndc", "kaplan"))]
    table = compare_laws(
        data, chosen, holdout=holdout, bootstrap=bootstrap, seed=seed, k=flops_factor
    )
    if as_json:
        _emit_json({"holdout": holdout, "laws": table.to_dict(orient="records")})
        return
    with np.printoptions(precision=4):
        click.echo(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


COMMANDS = [fit_cmd, predict_cmd, allocations_cmd, compare_cmd]

__all__ = ["COMMANDS", "allocations_cmd", "compare_cmd", "fit_cmd", "fit_text", "predict_cmd"]

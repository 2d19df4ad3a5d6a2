"""What a sweep says: the closing summary of `scaling run`, and the `scaling report` folder.

Both fit the law to the stored runs (or a table), predict the compute-optimal split and
loss at ten times the largest budget, and draw the figures of ``scaling.plots``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from scaling.errors import FitError
from scaling.fit.approaches import budget_groups
from scaling.fit.fitter import FitResult, fit, predict
from scaling.fit.table import load_source

log = logging.getLogger(__name__)

# Bootstrap resamples of the closing fit: enough for stable 90% intervals of a dozen runs,
# a few seconds on 2 cores.
SUMMARY_BOOTSTRAP = 200
EXTRAPOLATION_FACTOR = 10.0


@dataclass
class Analysis:
    """A fit of one source with its extrapolation and figures."""

    runs: pd.DataFrame
    fit: FitResult
    target_compute: float
    prediction: dict
    figures: list[Path] = field(default_factory=list)
    fit_path: Path | None = None
    warnings: list[str] = field(default_factory=list)


def analyze(
    source: Path | str,
    out_dir: Path | str,
    *,
    law: str = "chinchilla",
    columns: dict[str, str] | None = None,
    bootstrap: int = SUMMARY_BOOTSTRAP,
    seed: int = 0,
) -> Analysis:
    """Fit ``source``, predict at ten times its largest budget, write fit.json and figures."""
    source, out_dir = Path(source), Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_source(source, columns)
        if runs.empty:
            raise FitError(f"{source}: no finished runs to fit")
        result = fit(runs, law, bootstrap=bootstrap, seed=seed)
    target = EXTRAPOLATION_FACTOR * float(runs["compute"].max())
    prediction = predict(result, compute=target)

    out_dir.mkdir(parents=True, exist_ok=True)
    fit_path = out_dir / "fit.json"
    result.save(fit_path)

    curves = None
    if source.is_dir():
        from scaling.results import load_curves

        curves = load_curves(source, runs["run_id"] if "run_id" in runs.columns else None)
    from scaling.plots import plot_all

    figures = plot_all(runs, result, out_dir / "figures", curves=curves, extrapolate_to=target)
    notes = [str(w.message) for w in caught]
    return Analysis(runs, result, target, prediction, figures, fit_path, notes)


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _interval(pair: list[float] | None, digits: int = 4) -> str:
    return "" if not pair else f" [{_num(pair[0], digits)}, {_num(pair[1], digits)}]"


def _isoflop_minima(runs: pd.DataFrame) -> list[str]:
    """One line per IsoFLOP budget: the best run, and whether it is inside the sizes tried."""
    if "target_compute" not in runs.columns or runs["target_compute"].isna().any():
        return []
    lines = []
    for budget, group in runs.assign(budget=budget_groups(runs)).groupby("budget"):
        if len(group) < 3:
            continue
        group = group.sort_values("params")
        best = group["loss"].idxmin()
        where = (
            "inside the sizes tried"
            if group.index[0] != best and group.index[-1] != best
            else "at the edge of the sizes tried"
        )
        row = group.loc[best]
        lines.append(
            f"IsoFLOP C = {budget:.3g}: lowest loss {row['loss']:.4f} at N = {row['params']:,.0f}"
            f" ({row['tokens'] / row['params']:.0f} tokens/param), {where}"
        )
    return lines


def describe(analysis: Analysis) -> str:
    """The fitted law, the allocation and the extrapolated prediction, as text."""
    result, pred = analysis.fit, analysis.prediction
    level = int(round(100 * result.ci_level))
    lines = [f"fitted law ({result.law.name}, {result.n_points} runs): L = {result.law.formula}"]
    for name, value in result.params.items():
        err = result.stderr.get(name)
        lines.append(
            f"  {name:>6} = {_num(value)}"
            + ("" if err is None else f" ± {_num(err, 2)}")
            + _interval(result.ci.get(name) if result.ci else None)
        )
    lines += _isoflop_minima(analysis.runs)
    alloc = result.allocation
    if alloc is not None:
        ci = alloc.ci or {}
        lines.append(
            f"compute-optimal allocation: N_opt ∝ C^{alloc.a:.3f}{_interval(ci.get('a'), 3)}, "
            f"D_opt ∝ C^{alloc.b:.3f}{_interval(ci.get('b'), 3)}"
        )
    lines.append(
        f"at C = {analysis.target_compute:.3g} FLOPs (10x the largest budget): "
        f"N_opt = {pred['params']:,.0f} params, D_opt = {pred['tokens']:,.0f} tokens "
        f"({pred['tokens'] / pred['params']:.1f} tokens/param), predicted loss "
        f"{pred['loss']:.4f}"
        + (
            f" ({level}% interval {_interval(pred['interval']).strip()})"
            if pred["interval"]
            else ""
        )
    )
    # The fit's own diagnostics are also raised as warnings while fitting; show each once.
    others = [n for n in analysis.warnings if not any(n.endswith(w) for w in result.warnings)]
    for note in dict.fromkeys([*result.warnings, *others]):
        lines.append(f"warning: {note}")
    lines.append(f"fit: {analysis.fit_path}")
    lines.append("figures: " + ", ".join(str(p) for p in analysis.figures))
    return "\n".join(lines)


def closing_summary(sweep_dir: Path, law: str = "chinchilla") -> str:
    """What `scaling run` prints when a sweep is done."""
    return describe(analyze(sweep_dir, sweep_dir, law=law))


def write_report(
    source: Path | str,
    out_dir: Path | str,
    *,
    law: str = "chinchilla",
    columns: dict[str, str] | None = None,
    bootstrap: int = SUMMARY_BOOTSTRAP,
) -> Path:
    """Write ``report.md`` (runs, fit, allocation, prediction, figures) into ``out_dir``."""
    out_dir = Path(out_dir)
    analysis = analyze(source, out_dir, law=law, columns=columns, bootstrap=bootstrap)
    runs = analysis.runs
    cols = [c for c in ("run_id", "params", "tokens", "compute", "loss") if c in runs.columns]
    table = runs[cols].sort_values("compute")
    for name in ("params", "tokens"):
        if name in table.columns:
            table[name] = table[name].map(lambda v: f"{v:,.0f}")
    lines = [
        f"# Scaling report: {Path(source).name}",
        "",
        "## Fit",
        "",
        "```",
        describe(analysis),
        "```",
        "",
        "## Runs",
        "",
        "```",
        table.to_string(index=False),
        "```",
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in analysis.figures]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

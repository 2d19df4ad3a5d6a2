"""Figures of a sweep and its fit, written as PNG files.

- ``loss_vs_compute.png``: every run's validation curve against compute, the fitted
  compute-optimal frontier, and the compute-optimal points at the sweep's budgets.
- ``isoflop.png``: final loss against N for each budget, with the fitted law along each
  IsoFLOP line and its minimum.
- ``fit_vs_observed.png``: fitted against observed loss, with bootstrap intervals.
- ``allocation.png``: N_opt(C) and D_opt(C) of the fit, with the runs' N and D.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from scaling.fit.approaches import budget_groups  # noqa: E402
from scaling.fit.fitter import FitResult, predict, predict_arrays  # noqa: E402

log = logging.getLogger(__name__)


def _frontier(fit: FitResult, low: float, high: float) -> pd.DataFrame:
    budgets = np.geomspace(low, high, 40)
    return pd.DataFrame([predict(fit, compute=float(c)) for c in budgets])


def _size_colors(runs: pd.DataFrame):
    norm = LogNorm(
        vmin=runs["params"].min(), vmax=max(runs["params"].max(), 1.01 * runs["params"].min())
    )
    return norm, plt.get_cmap("viridis")


def plot_loss_vs_compute(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None,
    fit: FitResult | None,
    path: Path,
    extrapolate_to: float | None = None,
) -> Path:
    """Curves of every run against compute, with the fitted frontier."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    norm, cmap = _size_colors(runs)
    if curves is not None and not curves.empty:
        # Training loss is logged every interval; validation only at a few points.
        logged = curves.dropna(subset=["train_loss"])
        for run_id, curve in logged.groupby("run_id"):
            row = runs[runs["run_id"] == run_id]
            if row.empty:
                continue
            color = cmap(norm(row["params"].iloc[0]))
            ax.plot(curve["compute"], curve["train_loss"], color=color, alpha=0.5, lw=1)
    ax.scatter(
        runs["compute"],
        runs["loss"],
        c=runs["params"],
        cmap=cmap,
        norm=norm,
        s=18,
        zorder=3,
        label="final loss of each run",
    )
    if fit is not None and fit.allocation is not None:
        high = max(runs["compute"].max(), extrapolate_to or 0)
        front = _frontier(fit, runs["compute"].min() / 3, high)
        ax.plot(
            front["compute"],
            front["loss"],
            color="crimson",
            lw=2,
            label="fitted compute-optimal frontier",
        )
        if front["interval"].notna().all():
            band = np.array(front["interval"].tolist())
            ax.fill_between(front["compute"], band[:, 0], band[:, 1], color="crimson", alpha=0.15)
        opt = pd.DataFrame(
            [predict(fit, compute=float(c)) for c in sorted(set(budget_groups(runs)))]
        )
        ax.scatter(
            opt["compute"],
            opt["loss"],
            marker="*",
            s=140,
            color="crimson",
            edgecolor="black",
            zorder=4,
            label="compute-optimal points",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="loss (lines: training curves; points: final validation)",
        title="Loss against compute",
    )
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="parameters N")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_isoflop(runs: pd.DataFrame, fit: FitResult | None, path: Path) -> Path:
    """Final loss against N for each budget, with the fitted law along each IsoFLOP line."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    runs = runs.assign(budget=budget_groups(runs))
    palette = sns.color_palette("rocket", n_colors=runs["budget"].nunique())
    for color, (budget, group) in zip(palette, runs.groupby("budget"), strict=True):
        group = group.sort_values("params")
        ax.plot(group["params"], group["loss"], "o", color=color, label=f"C = {budget:.2g}")
        if fit is not None:
            n = np.geomspace(group["params"].min() / 1.5, group["params"].max() * 1.5, 60)
            frame = pd.DataFrame({"params": n, "tokens": budget / (6 * n), "compute": budget})
            pred, _ = predict_arrays(fit, frame)
            ax.plot(n, pred, "-", color=color, alpha=0.8)
            best = predict(fit, compute=float(budget))
            ax.plot(best["params"], best["loss"], "*", ms=12, color=color, mec="black")
    ax.set(
        xscale="log",
        xlabel="parameters N",
        ylabel="final validation loss",
        title="IsoFLOP profiles (lines: fitted law, stars: its minima)",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fit_vs_observed(runs: pd.DataFrame, fit: FitResult, path: Path) -> Path:
    """Fitted against observed loss, one point per run."""
    pred, band = predict_arrays(fit, runs)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if band is not None:
        ax.errorbar(
            runs["loss"], pred, yerr=np.abs(band.T - pred), fmt="none", ecolor="grey", alpha=0.5
        )
    ax.scatter(runs["loss"], pred, c=np.log10(runs["params"]), cmap="viridis", s=20, zorder=3)
    low = min(runs["loss"].min(), pred.min()) * 0.98
    high = max(runs["loss"].max(), pred.max()) * 1.02
    ax.plot([low, high], [low, high], "k--", lw=1)
    rel = np.abs(pred / runs["loss"].to_numpy() - 1)
    ax.set(
        xlabel="observed loss",
        ylabel="fitted loss",
        xlim=(low, high),
        ylim=(low, high),
        title=f"{fit.law.name}: mean |error| {100 * rel.mean():.2f}%",
    )
    return _save(fig, path)


def plot_allocation(
    runs: pd.DataFrame, fit: FitResult, path: Path, extrapolate_to: float | None = None
) -> Path:
    """Compute-optimal N and D against compute."""
    alloc = fit.allocation
    fig, ax = plt.subplots(figsize=(6.5, 5))
    high = max(runs["compute"].max(), extrapolate_to or 0)
    c = np.geomspace(runs["compute"].min() / 3, high * 1.5, 50)
    ax.plot(c, alloc.n_opt(c), color="tab:blue", label=f"N_opt ∝ C^{alloc.a:.3f}")
    ax.plot(c, alloc.d_opt(c), color="tab:orange", label=f"D_opt ∝ C^{alloc.b:.3f}")
    ax.scatter(runs["compute"], runs["params"], s=10, color="tab:blue", alpha=0.4, label="runs: N")
    ax.scatter(
        runs["compute"], runs["tokens"], s=10, color="tab:orange", alpha=0.4, label="runs: D"
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="N or D",
        title="Compute-optimal allocation",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(
    runs: pd.DataFrame,
    fit: FitResult | None,
    out_dir: Path,
    curves: pd.DataFrame | None = None,
    extrapolate_to: float | None = None,
) -> list[Path]:
    """Write every figure that the data allow into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    sns.set_theme(style="whitegrid", context="notebook")
    paths = [
        plot_loss_vs_compute(runs, curves, fit, out_dir / "loss_vs_compute.png", extrapolate_to)
    ]
    if len(set(budget_groups(runs))) < len(runs):
        paths.append(plot_isoflop(runs, fit, out_dir / "isoflop.png"))
    if fit is not None:
        paths.append(plot_fit_vs_observed(runs, fit, out_dir / "fit_vs_observed.png"))
        if fit.allocation is not None:
            paths.append(plot_allocation(runs, fit, out_dir / "allocation.png", extrapolate_to))
    return paths

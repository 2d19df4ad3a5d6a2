"""Commands over sweeps: plan, run, status."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pandas as pd

from scaling.errors import DataError, ScalingError, SpecError

log = logging.getLogger(__name__)


@contextmanager
def _naming(spec: Path) -> Iterator[None]:
    """Prefix spec errors found after loading (planning, the corpus) with the spec's path."""
    try:
        yield
    except (SpecError, DataError) as exc:
        if str(spec) in str(exc):
            raise
        raise type(exc)(f"{spec}: {exc}") from None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _plan_table(rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    shown = pd.DataFrame(
        {
            "run_id": frame["run_id"],
            "C budget": frame["target_compute"].map(lambda v: "-" if pd.isna(v) else _fmt(v)),
            "layers": frame["n_layers"],
            "d_model": frame["d_model"],
            "N": frame["params"].map(lambda v: f"{v:,}"),
            "D": frame["tokens"].map(lambda v: f"{v:,}"),
            "steps": frame["steps"],
            "D/N": frame["tokens_per_param"].map(lambda v: f"{v:.1f}"),
            "C (6ND)": frame["compute_6n"].map(_fmt),
            "C (shape)": frame["compute_shape"].map(_fmt),
            "est. s": frame["estimated_seconds"].map(lambda v: f"{v:.0f}"),
        }
    )
    if frame["branched_from"].notna().any():
        # WSD cooldown branches: the trunk each one leaves, and at which step.
        shown.insert(1, "trunk", frame["branched_from"].fillna("-"))
        shown.insert(
            2, "from step", frame["branch_step"].map(lambda v: "-" if pd.isna(v) else int(v))
        )
    return shown.to_string(index=False)


@click.command("plan")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def plan_cmd(spec: Path, as_json: bool) -> None:
    """Show every resolved run of SPEC (shape, N, D, C, estimated time) without running."""
    from scaling.cli import echo_json
    from scaling.plan import plan_sweep
    from scaling.spec import load_sweep

    sweep = load_sweep(spec)
    with _naming(spec):
        planned = plan_sweep(sweep)
    rows = [p.summary() for p in planned]
    total = sum(r["estimated_seconds"] for r in rows)
    if as_json:
        echo_json({"sweep": sweep.name, "runs": rows, "estimated_seconds": total})
        return
    click.echo(
        f"sweep {sweep.name}: {len(rows)} runs, plan {sweep.plan.kind}, "
        f"FLOP convention {sweep.flops}"
    )
    click.echo(_plan_table(rows))
    click.echo(f"estimated training time: {total / 60:.1f} min (sequential)")


@click.command("run")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option(
    "--executor",
    type=click.Choice(["local", "slurm"]),
    default=None,
    help="Override launch.executor.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Local worker processes (overrides launch.workers).",
)
@click.option(
    "--results",
    "results_root",
    type=click.Path(path_type=Path),
    default=Path("results"),
    show_default=True,
    help="Results root folder.",
)
@click.option("--retry-failed", is_flag=True, help="Train runs stored as failed again.")
@click.option(
    "--analyze/--no-analyze",
    default=True,
    show_default=True,
    help="Fit, predict and plot when the runs are done.",
)
@click.option("--law", default="chinchilla", show_default=True, help="Law of the closing fit.")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="With --executor slurm: wait for the job array (else submit and return).",
)
def run_cmd(
    spec: Path,
    executor: str | None,
    workers: int | None,
    results_root: Path,
    retry_failed: bool,
    analyze: bool,
    law: str,
    wait: bool,
) -> None:
    """Train the runs of SPEC that are not stored yet, then fit, predict and plot.

    With --executor slurm the missing runs (and failed ones, with --retry-failed) that no
    live job holds go to the cluster as one job array; the tasks store their own results.
    """
    from scaling.launch import run_sweep
    from scaling.spec import load_sweep

    sweep = load_sweep(spec)
    if executor is not None:
        sweep = sweep.model_copy(
            update={"launch": sweep.launch.model_copy(update={"executor": executor})}
        )
    with _naming(spec):
        outcome = run_sweep(
            sweep, results_root, workers=workers, retry_failed=retry_failed, wait=wait
        )
    click.echo(
        f"sweep {sweep.name}: {outcome.planned} runs planned, {len(outcome.trained)} trained, "
        f"{len(outcome.skipped)} already stored, {len(outcome.failed)} failed"
        + (f", {len(outcome.busy)} being trained elsewhere" if outcome.busy else "")
    )
    for run_id in outcome.failed:
        click.echo(f"  failed: {run_id} (see `scaling status {outcome.sweep_dir}`)")
    if outcome.submitted and not wait:
        click.echo(
            f"submitted {len(outcome.submitted)} runs; follow them with "
            f"`scaling status {outcome.sweep_dir}`"
        )
        analyze = False
    if analyze:
        from scaling.report import closing_summary

        try:
            click.echo(closing_summary(outcome.sweep_dir, law=law))
        except ScalingError as exc:
            click.echo(f"no fit yet: {exc}")
    click.echo(f"results: {outcome.sweep_dir}")
    if outcome.failed:
        sys.exit(1)  # the others are stored; a script still learns that some runs failed


@click.command("status")
@click.argument("sweep_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def status_cmd(sweep_dir: Path, as_json: bool) -> None:
    """Where every run of a sweep stands: pending, running, done, failed, diverged, preempted.

    Shows each run's job id and SLURM state (asking the scheduler for runs submitted to
    it), tokens done, last loss and the last line of a failed run's error.
    """
    from scaling.cli import echo_json
    from scaling.status import summary_line, sweep_status

    table = sweep_status(sweep_dir)
    counts = table["state"].value_counts().to_dict()
    summary = summary_line(table)
    if as_json:
        echo_json(
            {
                "sweep_dir": str(sweep_dir),
                "summary": counts,
                "summary_line": summary,
                "runs": table.astype(object).where(table.notna(), None).to_dict(orient="records"),
            }
        )
        return
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        shown = table.drop(columns=["error"]).astype(object)
        click.echo(shown.where(shown.notna(), "").to_string(index=False))
    for row in table.itertuples():
        if row.state == "failed" and row.error:
            click.echo(f"\n{row.run_id} failed:\n  " + str(row.error).strip().splitlines()[-1])
    click.echo(f"\n{summary}")


COMMANDS = [plan_cmd, run_cmd, status_cmd]

"""Commands that draw and report: plot, report."""

from __future__ import annotations

from pathlib import Path

import click


def _columns(items: tuple[str, ...]) -> dict[str, str]:
    from scaling.fit.table import parse_columns

    return parse_columns(items)


def _analysis_options(out_help: str):
    """The options `plot` and `report` share: SOURCE, --out, --law, --col, --bootstrap."""

    def decorate(command):
        for option in reversed(
            [
                click.argument("source", type=click.Path(path_type=Path)),
                click.option(
                    "--out",
                    "out_dir",
                    type=click.Path(path_type=Path),
                    required=True,
                    help=out_help,
                ),
                click.option("--law", default="chinchilla", show_default=True, help="Law to fit."),
                click.option(
                    "--col",
                    "cols",
                    multiple=True,
                    metavar="FIELD=NAME",
                    help="Map a table column: params=, tokens=, compute=, loss=.",
                ),
                click.option(
                    "--bootstrap",
                    type=click.IntRange(min=0),
                    default=200,
                    show_default=True,
                    help="Bootstrap resamples for the intervals and bands.",
                ),
            ]
        ):
            command = option(command)
        return command

    return decorate


@click.command("plot")
@_analysis_options("Folder for the PNG files.")
def plot_cmd(source: Path, out_dir: Path, law: str, cols: tuple[str, ...], bootstrap: int) -> None:
    """Fit SOURCE and draw its curves, fit and frontier as PNG files in --out."""
    from scaling.report import analyze

    analysis = analyze(source, out_dir, law=law, columns=_columns(cols), bootstrap=bootstrap)
    for path in analysis.figures:
        click.echo(str(path))


@click.command("report")
@_analysis_options("Folder for report.md, fit.json and figures.")
def report_cmd(
    source: Path, out_dir: Path, law: str, cols: tuple[str, ...], bootstrap: int
) -> None:
    """Write a Markdown report of SOURCE: the fit, the allocation, runs and figures."""
    from scaling.report import write_report

    path = write_report(source, out_dir, law=law, columns=_columns(cols), bootstrap=bootstrap)
    click.echo(str(path))


COMMANDS = [plot_cmd, report_cmd]

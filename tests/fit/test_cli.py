from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from synthetic import TRUTH

from scaling.cli.fit_cmds import COMMANDS
from scaling.errors import ScalingError


@click.group()
def cli():
    """A stand-in for the main group: it registers the fit commands."""


for _command in COMMANDS:
    cli.add_command(_command)


def _invoke(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    return result


@pytest.fixture(scope="module")
def table(tmp_path_factory, synthetic):
    path = tmp_path_factory.mktemp("fit") / "runs.csv"
    frame = synthetic.rename(columns={"params": "N_total"}).drop(columns=["tokens"])
    frame.to_csv(path, index=False)
    return path


def test_custom_formula_fit_and_predict(tmp_path, table):
    out = tmp_path / "fit.json"
    result = _invoke(
        [
            "fit", str(table), "--col", "params=N_total",
            "--law", "E + A*N**-alpha + B*D**-beta",
            "--param", "alpha=0:2", "--param", "beta=0:2:0.1,0.3,1",
            "--param", "A=0:inf", "--param", "B=0:inf", "--param", "E=0:10",
            "--json", "--out", str(out),
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert fitted["law"] == "custom"
    assert fitted["params"]["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.03)
    assert fitted["params"]["beta"] == pytest.approx(TRUTH["beta"], abs=0.03)
    assert fitted["allocation"]["method"] == "numerical"
    assert fitted["allocation"]["a"] == pytest.approx(0.28 / 0.62, abs=0.02)

    result = _invoke(["predict", str(out), "--params", "1e9", "--tokens", "2e10", "--json"])
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)
    assert set(predicted) >= {"compute", "params", "tokens", "loss", "interval"}
    truth = TRUTH["E"] + TRUTH["A"] * 1e9 ** -TRUTH["alpha"] + TRUTH["B"] * 2e10 ** -TRUTH["beta"]
    assert predicted["loss"] == pytest.approx(truth, rel=0.01)
    assert predicted["interval"] is None and predicted["interval_reason"]


def test_fit_human_output_and_predict_from_source(table):
    result = _invoke(["fit", str(table), "--col", "params=N_total"])
    assert result.exit_code == 0, result.output
    assert "alpha" in result.stdout and "allocation" in result.stdout
    result = _invoke(
        ["predict", str(table), "--col", "params=N_total", "--compute", "1e21", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["compute"] == 1e21


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--law", "nonsense"], "--law 'nonsense': unknown law; valid: chinchilla"),
        (["--law", "E + A*N**-alpha", "--param", "alpha=2:0"], "LOW (2.0) must be below"),
        (["--law", "E + A*N**-alpha", "--param", "zeta=0:1"], "zeta: not in the formula"),
        (["--law", "E + __import__('os')"], "only exp, log"),
    ],
)
def test_user_mistakes_raise_scaling_errors(table, args, message):
    result = _invoke(["fit", str(table), "--col", "params=N_total", *args])
    assert isinstance(result.exception, ScalingError), result.output
    assert message in str(result.exception)


def test_predict_needs_a_point(table):
    result = _invoke(["predict", str(table), "--params", "1e9"])
    assert isinstance(result.exception, ScalingError)
    assert "--compute" in str(result.exception)


def test_approach_2_allocations_and_compare(table):
    result = _invoke(["fit", str(table), "--col", "params=N_total", "--approach", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["approach"] == 2 and payload["allocation"]["a"] == pytest.approx(0.45, abs=0.03)

    result = _invoke(
        ["allocations", str(table), "--col", "params=N_total", "--bootstrap", "20", "--json"]
    )
    assert result.exit_code == 0, result.output
    table_json = json.loads(result.stdout)
    assert table_json["1 (training-curve envelope)"]["allocation"] is None
    assert table_json["3 (parametric)"]["allocation"]["ci"]["a"] is not None

    result = _invoke(["allocations", str(table), "--col", "params=N_total", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "2 (IsoFLOP parabolas)" in result.stdout and "unavailable" in result.stdout

    result = _invoke(
        ["compare", str(table), "--col", "params=N_total", "--law", "chinchilla",
         "--law", "nd-noE", "--bootstrap", "10", "--json"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["laws"]
    assert [r["law"] for r in rows] == ["chinchilla", "nd-noE"]
    assert {"aic", "bic", "holdout_mean_abs_error", "holdout_coverage"} <= set(rows[0])

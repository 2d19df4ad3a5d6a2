"""User mistakes through the command line: one clear line, exit status 2, no traceback."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from scaling.cli import cli
from scaling.results import run_path, write_run


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _spec(tmp_path, **over) -> str:
    raw = {
        "name": "bad",
        "data": {"corpus": "stdlib", "seq_len": 32},
        "model": {"head_dim": 8},
        "train": {"batch_tokens": 256},
        "plan": {"kind": "grid", "params": [5.0e3], "tokens": [1.0e5]},
    }
    raw.update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize("command", ["plan", "run"])
def test_unknown_key_is_named_before_any_work(tmp_path, command):
    spec = _spec(tmp_path, train={"batch_tokens": 256, "learning_rate": 1e-3})
    result = (
        _run(command, spec, "--results", str(tmp_path / "r"))
        if command == "run"
        else _run(command, spec)
    )
    _assert_user_error(result, spec, "unknown key 'train.learning_rate'")
    assert not (tmp_path / "r").exists()


def test_missing_corpus_is_named_before_any_run(tmp_path):
    spec = _spec(tmp_path, data={"corpus": str(tmp_path / "no-such-dir"), "seq_len": 32})
    result = _run("run", spec, "--results", str(tmp_path / "r"), "--no-analyze")
    _assert_user_error(result, "no-such-dir")
    assert not list((tmp_path / "r").glob("*/runs/*.parquet"))


def test_impossible_budget_is_refused_by_plan(tmp_path):
    spec = _spec(tmp_path, plan={"kind": "isoflop", "compute": [1.0e6], "params": [5e3, 1e4]})
    _assert_user_error(_run("plan", spec), "plan.compute[0] = 1e+06: too small")


def test_missing_spec_file(tmp_path):
    _assert_user_error(_run("plan", str(tmp_path / "none.yaml")), "sweep spec not found")


def test_fit_of_table_with_missing_column_names_it(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("N,loss\n1e6,3.0\n2e6,2.9\n")
    result = _run("fit", str(table), "--col", "params=N")
    _assert_user_error(result, "t.csv")


def test_truncated_result_is_set_aside_and_the_rest_still_loads(tmp_path):
    sweep = tmp_path / "sweep"
    for i in range(3):
        write_run(
            sweep,
            {
                "run_id": f"r{i}",
                "status": "done",
                "params": 10 ** (4 + i),
                "tokens": 10**6,
                "compute": 6 * 10 ** (10 + i),
                "loss": 3.0 - 0.2 * i,
            },
        )
    broken = run_path(sweep, "r2")
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.warns(UserWarning, match="r2.parquet: cannot be read"):
        result = CliRunner().invoke(cli, ["status", str(sweep), "--json"])
    assert result.exit_code == 0
    assert (sweep / "runs" / "r2.parquet.unreadable").exists()
    assert run_path(sweep, "r0").exists() and run_path(sweep, "r1").exists()


def _law_table(tmp_path):
    """A 3x3 grid of (N, D) with losses from a Chinchilla-like law, as a CSV table."""
    table = tmp_path / "t.csv"
    rows = [
        (n, d, 1.7 + 400 * n**-0.34 + 410 * d**-0.28)
        for n in (1e6, 1e7, 1e8)
        for d in (1e8, 1e9, 1e10)
    ]
    table.write_text("params,tokens,loss\n" + "".join(f"{n},{d},{l}\n" for n, d, l in rows))
    return table


def test_contradictory_predict_flags_are_refused(tmp_path):
    table = _law_table(tmp_path)
    result = _run("predict", str(table), "--compute", "1e13", "--params", "1e5", "--tokens", "1e6")
    _assert_user_error(result, "--compute 1e+13 contradicts --params and --tokens")


def test_odd_sized_token_file_is_named(tmp_path):
    tokens = tmp_path / "odd.bin"
    tokens.write_bytes(b"\x01" * 1001)
    spec = _spec(tmp_path, data={"corpus": str(tokens), "seq_len": 32})
    _assert_user_error(_run("plan", spec), "odd.bin has 1001 bytes, not a whole number")


def test_unwritable_output_path_is_one_line(tmp_path):
    table = _law_table(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run("plot", str(table), "--out", str(blocker / "sub"), "--bootstrap", "0")
    _assert_user_error(result, str(blocker))


def test_too_few_steps_in_a_grid_is_refused(tmp_path):
    spec = _spec(tmp_path, plan={"kind": "grid", "params": [5.0e3], "tokens": [1000]})
    _assert_user_error(_run("plan", spec), "spec.yaml: plan.tokens: a run of 1,024 tokens")

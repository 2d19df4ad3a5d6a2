"""The whole path on a tiny sweep: plan -> run -> fit -> predict -> plot, and a rerun."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from scaling.cli import cli

pytestmark = pytest.mark.slow

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(4000))


@pytest.fixture
def tiny_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    spec = {
        "name": "tiny",
        "data": {"corpus": str(corpus), "seq_len": 32, "val_tokens": 2048},
        "model": {"family": "gpt", "aspect_ratio": 16, "head_dim": 8},
        "train": {"batch_tokens": 512, "lr": 1.0e-2, "eval_points": 3, "log_interval": 20},
        "plan": {"kind": "isoflop", "compute": [1.0e9, 3.0e9], "params": [3.0e3, 8.0e3, 2.0e4]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, tmp_path / "results"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_plan_run_fit_predict_and_rerun(tiny_sweep, tmp_path):
    spec, results = tiny_sweep

    plan = json.loads(_invoke("plan", str(spec), "--json"))
    assert len(plan["runs"]) == 6
    run_ids = {r["run_id"] for r in plan["runs"]}

    out = _invoke("run", str(spec), "--results", str(results), "--no-analyze")
    assert "6 trained" in out
    sweep_dir = results / "tiny"
    stored = {p.stem for p in (sweep_dir / "runs").glob("*.parquet")}
    assert stored == run_ids
    assert {p.stem for p in (sweep_dir / "curves").glob("*.parquet")} == run_ids

    fit_path = tmp_path / "fit.json"
    fitted = json.loads(
        _invoke("fit", str(sweep_dir), "--law", "chinchilla", "--json", "--out", str(fit_path))
    )
    assert fitted["n_points"] == 6
    assert set(fitted["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert fit_path.exists()

    pred = json.loads(_invoke("predict", str(fit_path), "--compute", "1e10", "--json"))
    assert math.isfinite(pred["loss"]) and pred["params"] > 0 and pred["tokens"] > 0
    pred_nd = json.loads(
        _invoke("predict", str(fit_path), "--params", "1e4", "--tokens", "1e6", "--json")
    )
    assert math.isfinite(pred_nd["loss"])

    # A rerun trains nothing new and rewrites nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (sweep_dir / "runs").glob("*.parquet")}
    out = _invoke("run", str(spec), "--results", str(results), "--no-analyze")
    assert "0 trained" in out and "6 already stored" in out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (sweep_dir / "runs").glob("*.parquet")}

    status = json.loads(_invoke("status", str(sweep_dir), "--json"))
    assert status["summary"] == {"done": 6}

    figures = _invoke("plot", str(sweep_dir), "--out", str(tmp_path / "figs"), "--bootstrap", "20")
    assert "loss_vs_compute.png" in figures and "isoflop.png" in figures

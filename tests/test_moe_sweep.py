"""A tiny Mixture-of-Experts sweep end to end through the CLI: plan -> run -> fit.

MoE models are sized by their active parameters and their compute counts active parameters
(C = 6 N_active D): the stored rows must say so, and a law must fit on them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from scaling.cli import cli
from scaling.model.count import ModelShape, count
from scaling.results import load_runs
from scaling.spec import RunSpec

pytestmark = pytest.mark.slow

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(4000))
BUDGETS = [1.0e9, 3.0e9]
SIZES = [3.0e3, 8.0e3, 2.0e4]  # active parameters


@pytest.fixture
def tiny_moe_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    spec = {
        "name": "tiny-moe",
        "data": {"corpus": str(corpus), "seq_len": 32, "val_tokens": 2048},
        "model": {
            "family": "moe",
            "aspect_ratio": 16,
            "head_dim": 8,
            "num_experts": 8,
            "top_k": 2,
        },
        "train": {"batch_tokens": 512, "lr": 1.0e-2, "eval_points": 3, "log_interval": 20},
        "plan": {"kind": "isoflop", "compute": BUDGETS, "params": SIZES},
    }
    path = tmp_path / "tiny-moe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, tmp_path / "results"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_moe_sweep_plan_run_fit(tiny_moe_sweep: tuple[Path, Path]) -> None:
    spec, results = tiny_moe_sweep

    plan = json.loads(_invoke("plan", str(spec), "--json"))
    assert len(plan["runs"]) == 6
    for run in plan["runs"]:
        assert run["family"] == "moe"
        # Sized by active parameters: close to the target, well under the total.
        assert abs(math.log(run["params_active"] / run["target_params"])) < math.log(1.6)
        # ... and the total counts all 8 experts of every layer, the active count 2 of them.
        idle = run["n_layers"] * (8 - 2) * 2 * run["d_model"] * 4 * run["d_model"]
        assert run["params"] - run["params_active"] == idle
        assert run["compute"] == pytest.approx(run["target_compute"], rel=0.05)

    out = _invoke("run", str(spec), "--results", str(results), "--no-analyze")
    assert "6 trained" in out
    runs = load_runs(results / "tiny-moe")
    assert len(runs) == 6 and (runs["status"] == "done").all()
    assert set(runs["run_id"]) == {r["run_id"] for r in plan["runs"]}
    for row in runs.to_dict("records"):
        counts = count(ModelShape(**RunSpec.model_validate_json(row["spec"]).shape))
        assert row["num_experts"] == 8 and row["top_k"] == 2
        assert row["params_active"] == counts.params_active < row["params"]
        # Compute counts the active parameters, never the total.
        assert row["flops_6n"] == 6 * row["params_active"]
        assert row["compute"] == row["compute_6n"] == row["tokens"] * 6 * row["params_active"]
        assert row["compute"] == pytest.approx(row["target_compute"], rel=0.05)
        assert math.isfinite(row["loss"]) and row["loss"] < math.log(256)

    fitted = json.loads(_invoke("fit", str(results / "tiny-moe"), "--law", "chinchilla", "--json"))
    assert fitted["n_points"] == 6
    assert all(math.isfinite(v) for v in fitted["params"].values())

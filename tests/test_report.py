"""The closing analysis: which size column a sweep is fitted on."""

from __future__ import annotations

from scaling.report import _moe_columns
from scaling.results import write_run


def test_moe_sweep_is_fitted_on_active_parameters(tmp_path):
    for i, family in enumerate(["moe", "moe"]):
        write_run(
            tmp_path,
            {
                "run_id": f"r{i}",
                "status": "done",
                "family": family,
                "params": 8 * 10 ** (4 + i),
                "params_active": 10 ** (4 + i),
            },
        )
    assert _moe_columns(tmp_path) == {"params": "params_active"}


def test_dense_sweep_and_tables_keep_their_columns(tmp_path):
    write_run(tmp_path, {"run_id": "r0", "status": "done", "family": "gpt", "params": 10**4})
    assert _moe_columns(tmp_path) is None
    table = tmp_path / "t.csv"
    table.write_text("params,tokens,loss\n")
    assert _moe_columns(table) is None

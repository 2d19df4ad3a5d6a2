"""Which size column a results folder is fitted on."""

from __future__ import annotations

from scaling.fit.table import load_source
from scaling.results import write_run


def _store(folder, family):
    for i in range(3):
        write_run(
            folder,
            {
                "run_id": f"r{i}",
                "status": "done",
                "family": family,
                "params": 8 * 10 ** (4 + i),
                "params_active": 10 ** (4 + i),
                "tokens": 10**6,
                "compute": 6e10 * 10**i,
                "loss": 3.0 - 0.1 * i,
            },
        )


def test_moe_sweep_is_fitted_on_active_parameters(tmp_path):
    _store(tmp_path, "moe")
    assert sorted(load_source(tmp_path)["params"]) == [1e4, 1e5, 1e6]


def test_dense_sweep_keeps_all_parameters(tmp_path):
    _store(tmp_path, "gpt")
    assert sorted(load_source(tmp_path)["params"]) == [8e4, 8e5, 8e6]

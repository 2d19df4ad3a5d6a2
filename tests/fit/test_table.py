from __future__ import annotations

import pandas as pd
import pytest

from scaling.errors import ResultsError
from scaling.fit.table import load_source, load_table, parse_columns


def _write(tmp_path, frame: pd.DataFrame, name: str = "runs.csv"):
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def test_mapping_and_derived_tokens(tmp_path):
    path = _write(
        tmp_path, pd.DataFrame({"size": [1e8, 2e8], "flop": [6e17, 2.4e18], "y": [3, 2.9]})
    )
    table = load_table(path, parse_columns(["params=size", "compute=flop", "loss=y"]))
    assert table["tokens"].tolist() == pytest.approx([1e9, 2e9])


def test_derived_compute_from_parquet(tmp_path):
    frame = pd.DataFrame({"params": [1e8], "tokens": [1e9], "loss": [3.0]})
    table = load_table(_write(tmp_path, frame, "runs.parquet"))
    assert table["compute"].iloc[0] == pytest.approx(6e17)


def test_missing_column_names_file_and_columns(tmp_path):
    path = _write(tmp_path, pd.DataFrame({"params": [1e8], "tokens": [1e9], "val": [3.0]}))
    with pytest.raises(ResultsError) as info:
        load_table(path)
    message = str(info.value)
    assert str(path) in message and "'loss'" in message and "params, tokens, val" in message


def test_mapped_column_absent(tmp_path):
    path = _write(tmp_path, pd.DataFrame({"params": [1e8], "tokens": [1e9], "loss": [3.0]}))
    with pytest.raises(ResultsError, match="'Model Size'.*columns present: params, tokens, loss"):
        load_table(path, {"params": "Model Size"})


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_values_name_rows(tmp_path, bad):
    frame = pd.DataFrame({"params": [1e8, bad, 3e8], "tokens": [1e9] * 3, "loss": [3.0] * 3})
    with pytest.raises(ResultsError) as info:
        load_table(_write(tmp_path, frame))
    message = str(info.value)
    assert "runs.csv" in message and "'params'" in message and "row 3" in message


def test_parse_columns_rejects_unknown_field():
    with pytest.raises(ResultsError, match="unknown field 'size'"):
        parse_columns(["size=params"])


def test_load_source_directory_uses_results(tmp_path, monkeypatch):
    import scaling.results

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "status": ["done", "failed"],
            "params": [1e8, 2e8],
            "tokens": [1e9, 1e9],
            "compute": [6e17, 1.2e18],
            "loss": [3.0, float("nan")],
        }
    )
    monkeypatch.setattr(scaling.results, "load_runs", lambda path: runs, raising=False)
    with pytest.warns(UserWarning, match=r"b \(failed\)"):
        table = load_source(tmp_path)
    assert table["run_id"].tolist() == ["a"]


def test_results_folder_column_can_be_replaced_by_another(tmp_path):
    # An MoE sweep is fitted on active parameters: --col params=params_active.
    from scaling.results import write_run

    for i in range(3):
        write_run(
            tmp_path,
            {
                "run_id": f"r{i}",
                "status": "done",
                "params": 8 * 10 ** (4 + i),
                "params_active": 10 ** (4 + i),
                "tokens": 10**6,
                "compute": 6e10 * 10**i,
                "loss": 3.0 - 0.1 * i,
            },
        )
    frame = load_source(tmp_path, {"params": "params_active"})
    assert list(frame.columns).count("params") == 1
    assert sorted(frame["params"]) == [1e4, 1e5, 1e6]

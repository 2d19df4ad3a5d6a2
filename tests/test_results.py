"""The Parquet store: declared schema, atomic writes, unreadable files set aside."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from scaling.errors import ResultsError
from scaling.results import (
    CURVES_SCHEMA,
    RUNS_SCHEMA,
    load_curves,
    load_runs,
    read_run,
    run_path,
    write_curve,
    write_run,
)


def test_rows_are_cast_to_the_declared_schema(tmp_path):
    write_run(tmp_path, {"run_id": "a", "status": "done", "params": 10, "loss": 2.5})
    write_curve(tmp_path, "a", [{"step": 1, "tokens": 64, "train_loss": 3.0}])
    assert pq.read_schema(run_path(tmp_path, "a")).remove_metadata() == RUNS_SCHEMA
    runs, curves = load_runs(tmp_path), load_curves(tmp_path)
    assert runs.loc[0, "params"] == 10 and runs.loc[0, "loss"] == 2.5
    assert list(curves.columns) == CURVES_SCHEMA.names
    assert read_run(tmp_path, "a")["status"] == "done"
    assert read_run(tmp_path, "missing") is None


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(ResultsError, match="columns not in the schema: \\['oops'\\]"):
        write_run(tmp_path, {"run_id": "a", "oops": 1})


def test_truncated_file_is_set_aside_with_a_warning(tmp_path):
    write_run(tmp_path, {"run_id": "good", "status": "done"})
    write_run(tmp_path, {"run_id": "bad", "status": "done"})
    path = run_path(tmp_path, "bad")
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="bad.parquet: cannot be read"):
        runs = load_runs(tmp_path)
    assert list(runs["run_id"]) == ["good"]
    assert (tmp_path / "runs" / "bad.parquet.unreadable").exists()
    assert run_path(tmp_path, "good").exists()


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    write_run(tmp_path, {"run_id": "a", "status": "done", "loss": 1.0})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        write_run(tmp_path, {"run_id": "a", "status": "done", "loss": 9.0})
    monkeypatch.undo()
    assert load_runs(tmp_path).loc[0, "loss"] == 1.0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a.parquet"]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ResultsError, match="nowhere: not a results folder"):
        load_runs(tmp_path / "nowhere")
    with pytest.raises(ResultsError, match="no runs/ folder"):
        load_runs(tmp_path)

"""Executors without a cluster: launch settings, resource checks, concurrent commands, DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from scaling import distributed, slurm
from scaling.errors import LaunchError, SpecError
from scaling.launch import execute_run, failed_row
from scaling.model.count import ModelShape
from scaling.results import load_runs, read_run
from scaling.spec import DataSpec, LaunchSpec, ModelSpec, RunSpec, TrainSpec, parse_sweep

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000))
SEQ_LEN = 16


def sweep_spec(tmp_path: Path, **launch: object) -> dict:
    """A sweep of six tiny runs over a text corpus in ``tmp_path``."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return {
        "name": "tiny",
        "data": {"corpus": str(corpus), "seq_len": 32, "val_tokens": 1024},
        "model": {"family": "gpt", "aspect_ratio": 16, "head_dim": 8},
        "train": {"batch_tokens": 256, "lr": 1.0e-2, "eval_points": 2, "threads": 1},
        "plan": {"kind": "grid", "params": [2.0e3, 5.0e3], "tokens": [4.0e3, 8.0e3, 1.6e4]},
        "launch": launch,
    }


# --- launch settings ---------------------------------------------------------------------


def _launch(**launch: object) -> LaunchSpec:
    raw = {"name": "x", "plan": {"kind": "grid", "params": [1e4], "tokens": [1e5]}}
    return parse_sweep({**raw, "launch": launch}).launch


def test_unknown_sbatch_option_lists_the_valid_ones() -> None:
    with pytest.raises(SpecError) as info:
        _launch(executor="slurm", sbatch={"reservaton": "r1"})
    message = str(info.value)
    assert "launch.sbatch" in message and "'reservaton'" in message
    assert "did you mean 'reservation'" in message and "mail-user" in message


def test_sbatch_options_are_normalised_and_spec_fields_not_duplicated() -> None:
    assert _launch(sbatch={"--mail_user": "a@b", "exclusive": True}).sbatch == {
        "mail-user": "a@b",
        "exclusive": True,
    }
    with pytest.raises(SpecError, match="set by launch.cpus_per_task"):
        _launch(sbatch={"cpus-per-task": 4})
    with pytest.raises(SpecError, match="set by the executor"):
        _launch(sbatch={"array": "0-3"})
    with pytest.raises(SpecError, match="launch.partition"):
        _launch(partition=" ")
    with pytest.raises(SpecError, match="unknown key 'launch.cpus'"):
        _launch(cpus=4)


PARTS = [
    slurm.Partition("cpu", True, cpus=8, memory_mb=16000, gpus=0, time_limit_min=120),
    slurm.Partition("gpu", False, cpus=32, memory_mb=256000, gpus=4, time_limit_min=float("inf")),
]


@pytest.mark.parametrize(
    ("launch", "message"),
    [
        (
            {"partition": "nosuch"},
            "launch.partition = 'nosuch': no such partition; valid: cpu, gpu",
        ),
        ({"cpus_per_task": 4, "tasks_per_node": 3}, "12 CPUs per node, but the nodes of"),
        ({"mem_gb": 64}, "launch.mem_gb = 64.0: more than the 15.6 GB"),
        ({"gpus_per_node": 1}, "partition 'cpu' have at most 0 GPUs"),
        ({"time_min": 500}, "over the time limit of partition 'cpu' (120 min)"),
    ],
)
def test_requests_no_node_can_satisfy_are_refused(
    monkeypatch: pytest.MonkeyPatch, launch: dict, message: str
) -> None:
    monkeypatch.setattr(slurm, "partitions", lambda: PARTS)
    with pytest.raises(LaunchError) as info:
        slurm.check_resources(_launch(**launch))
    assert message in str(info.value)
    assert slurm.check_resources(_launch(partition="gpu", gpus_per_node=4)).name == "gpu"


def test_no_default_partition_needs_one_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "partitions", lambda: PARTS[1:])
    with pytest.raises(LaunchError, match="no default partition; choose one of: gpu"):
        slurm.check_resources(_launch())


def test_scheduler_output_parsing() -> None:
    assert slurm._expand("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert slurm._parse_states("12_3|CANCELLED by 0\n13|RUNNING\n") == {
        "12_3": "CANCELLED",
        "13": "RUNNING",
    }
    assert slurm._sinfo_time("1-02:03:00") == 1440 + 123
    assert slurm._sinfo_time("30:00") == 30
    assert slurm._sinfo_time("infinite") == float("inf")


def test_version_comparison_names_each_difference() -> None:
    here = {"python": "3.11.7", "torch": "2.13.0", "numpy": "2.0.0"}
    there = {"python": "3.11.7", "torch": "2.12.0"}
    assert slurm.compare_versions(here, there) == [
        "numpy: 2.0.0 here, missing on the node",
        "torch: 2.13.0 here, 2.12.0 on the node",
    ]


def _run(tmp_path: Path, steps: int = 12, d_model: int = 32, **train: object) -> RunSpec:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    shape = ModelShape(
        vocab_size=256, seq_len=SEQ_LEN, n_layers=1, d_model=d_model, n_heads=1, d_ff=64
    )
    settings: dict = dict(batch_tokens=8 * SEQ_LEN, log_interval=4, eval_points=3, threads=1)
    settings.update(train)
    return RunSpec(
        sweep="test",
        data=DataSpec(corpus=str(corpus), seq_len=SEQ_LEN, val_tokens=20 * (SEQ_LEN + 1)),
        model=ModelSpec(),
        train=TrainSpec(**settings),
        shape=shape.to_dict(),
        steps=steps,
        tokens=steps * int(settings["batch_tokens"]),
        target_params=1e4,
    )


def test_task_killed_from_outside_is_stored_failed_with_its_log(tmp_path: Path) -> None:
    run = _run(tmp_path)
    log = tmp_path / "12_3_0_log.err"
    log.write_text("start\nslurmstepd: error: Detected 1 oom_kill event\n")
    jobs = {run.run_id: {"job_id": "12_3", "log": str(log), "spec": run.model_dump_json()}}

    assert slurm.reconcile(tmp_path, jobs, {"12_3": "RUNNING"}) == []
    assert slurm.reconcile(tmp_path, jobs, {"12_3": "OUT_OF_MEMORY"}) == [run.run_id]
    row = read_run(tmp_path, run.run_id)
    assert row["status"] == "failed" and row["slurm_state"] == "OUT_OF_MEMORY"
    assert row["job_id"] == "12_3" and "oom_kill" in row["error"]
    # A row already there (the task stored its own failure) is kept as it is.
    assert slurm.reconcile(tmp_path, jobs, {"12_3": "FAILED"}) == []


def test_failed_row_carries_the_job(tmp_path: Path) -> None:
    run = _run(tmp_path)
    row = failed_row(run, ValueError("boom"), job_id="7_1", slurm_state="FAILED")
    assert row["job_id"] == "7_1" and row["slurm_state"] == "FAILED"
    assert row["error"].splitlines()[-1] == "ValueError: boom"


# --- two commands at once ----------------------------------------------------------------


@pytest.mark.slow
def test_two_local_commands_at_once_train_each_run_once(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(tmp_path)))
    env = {**os.environ, "SCALING_CACHE_DIR": str(tmp_path / "cache")}
    scaling_cmd = str(Path(sys.executable).parent / "scaling")
    command = [scaling_cmd, "run", str(spec), "--no-analyze"]
    command += ["--results", str(tmp_path / "results")]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs

    trained = [int(o.split(" trained")[0].rsplit(" ", 1)[1]) for o, _ in outs]
    assert sum(trained) == 6, outs
    runs = load_runs(tmp_path / "results" / "tiny")
    assert len(runs) == 6 and set(runs["status"]) == {"done"}


# --- DDP on two CPU processes ------------------------------------------------------------


def _capture_loops(loops: list, patch: object = setattr) -> None:
    """Keep each trainer loop (its model) as it starts: the test compares parameters."""
    import scaling.train

    original = scaling.train._Loop.resume

    def resume(self: object) -> None:
        loops.append(self)
        original(self)

    patch(scaling.train._Loop, "resume", resume)


def _ddp_worker(rank: int, world: int, port: int, run_json: str, sweep_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    loops: list = []
    _capture_loops(loops)
    try:
        status = execute_run(RunSpec.model_validate_json(run_json), Path(sweep_dir))
        params = torch.cat([p.detach().flatten() for p in loops[0].model.parameters()])
        state = {"status": status, "params": params, "world": distributed.world_size()}
        torch.save(state, Path(sweep_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_two_processes_matches_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path, steps=10)
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), run.model_dump_json(), str(ddp_dir)), nprocs=2)
    ranks = [torch.load(ddp_dir / f"rank{r}.pt") for r in (0, 1)]
    assert [(r["status"], r["world"]) for r in ranks] == [("done", 2), ("done", 2)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "ranks drifted apart"

    loops: list = []
    _capture_loops(loops, monkeypatch.setattr)
    assert execute_run(run, tmp_path / "single") == "done"
    single = torch.cat([p.detach().flatten() for p in loops[0].model.parameters()])
    torch.testing.assert_close(ranks[0]["params"], single, rtol=1e-4, atol=1e-5)

    # Rank 0 alone wrote the run, with the whole batch's loss.
    ddp_row, single_row = read_run(ddp_dir, run.run_id), read_run(tmp_path / "single", run.run_id)
    assert ddp_row["train_loss"] == pytest.approx(single_row["train_loss"], rel=1e-5)
    assert ddp_row["loss"] == pytest.approx(single_row["loss"], rel=1e-5)
    assert json.loads(ddp_row["spec"]) == json.loads(run.model_dump_json())

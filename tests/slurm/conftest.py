"""Fixtures for the tests that submit real jobs to SLURM through submitit.

They run against whatever cluster `sinfo` reaches: on one machine, start one with
`scripts/slurm-local.sh start` (as root). Without a reachable cluster they are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import submitit


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests need to know of the cluster reached by `sinfo`."""

    partition: str | None
    """Partition to submit to; None for the cluster's default."""
    max_cpus_per_node: int
    """The most CPUs any node of the partition has."""


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=15, check=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The reachable SLURM cluster; skips the test when there is none."""
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM cluster: `sinfo` is not on PATH (scripts/slurm-local.sh start)")

    # NOTE: SCALING_SLURM_PARTITION picks a partition on a shared cluster; the local
    # cluster's only partition is its default.
    partition = os.environ.get("SCALING_SLURM_PARTITION") or None
    part_args = ["-p", partition] if partition else []
    try:
        # `scontrol ping` fails at once when no controller answers; sinfo retries for 9 s.
        ping = _run("scontrol", "ping")
        if ping.returncode != 0:
            msg = ping.stdout.strip().splitlines()[:1]
            pytest.skip(f"no SLURM cluster: `scontrol ping`: {msg} (scripts/slurm-local.sh start)")
        nodes = _run("sinfo", "-h", *part_args, "-o", "%T %c")
    except subprocess.TimeoutExpired:
        pytest.skip("no SLURM cluster: SLURM commands did not answer within 15 s")
    if nodes.returncode != 0:
        pytest.skip(f"no SLURM cluster: `sinfo` failed: {nodes.stderr.strip()}")

    # One line per node group: state (with flag suffixes such as `*` or `~`) and CPUs.
    rows = [line.split() for line in nodes.stdout.splitlines() if line.strip()]
    usable = {"idle", "mixed", "allocated", "completing"}
    if not any(state.rstrip("*~#!%$@^-+") in usable for state, _ in rows):
        pytest.skip(f"no usable SLURM node; node states: {[state for state, _ in rows]}")
    max_cpus = max(int(cpus.rstrip("+")) for _, cpus in rows)
    return SlurmCluster(partition=partition, max_cpus_per_node=max_cpus)


@pytest.fixture
def slurm_executor(slurm_cluster: SlurmCluster, tmp_path: Path) -> submitit.AutoExecutor:
    """A submitit executor on the cluster, its logs and pickles under `tmp_path`."""
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, slurm_array_parallelism=4)
    if slurm_cluster.partition:
        executor.update_parameters(slurm_partition=slurm_cluster.partition)
    return executor

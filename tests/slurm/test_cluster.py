"""Real jobs through submitit on a SLURM cluster: arrays, failures, refused requests."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm

# The jobs unpickle these functions in a fresh interpreter that cannot import the test
# module by name (pytest puts tests/ on its own path), so they travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError(f"task {x} fails on purpose")
    return x


def test_array_returns_every_result(slurm_executor: submitit.AutoExecutor) -> None:
    jobs = slurm_executor.map_array(square, range(4))

    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "one array, not four jobs"
    assert [job.result() for job in jobs] == [0, 1, 4, 9]
    assert all(job.done(force_check=True) for job in jobs)


def test_failing_task_keeps_the_others(slurm_executor: submitit.AutoExecutor) -> None:
    jobs = slurm_executor.map_array(fail_on_two, range(4))

    with pytest.raises(FailedJobError, match="fails on purpose"):
        jobs[2].result()
    assert [jobs[i].result() for i in (0, 1, 3)] == [0, 1, 3]


def test_request_larger_than_node_is_refused(
    slurm_cluster: SlurmCluster, slurm_executor: submitit.AutoExecutor
) -> None:
    slurm_executor.update_parameters(cpus_per_task=slurm_cluster.max_cpus_per_node + 1)

    with pytest.raises(FailedJobError, match="submission failed"):
        slurm_executor.submit(square, 3)

"""torch.distributed for one run that spans several processes (data-parallel, DDP).

A SLURM job with more than one task (``launch.tasks_per_node``, ``launch.nodes``) trains
one run on all of them: ``init_from_slurm`` sets up the process group from the job's
environment, the trainer wraps the model in ``DistributedDataParallel``, each rank takes
its share of every batch (``shard``) and only rank 0 writes results and checkpoints.
Outside a process group every function here is the single-process identity.

NOTE: if one rank fails while the others wait in a collective, the others wait until the
process group's time-out (``TIMEOUT``), and the job then ends failed.
NOTE: the trainer checks for SIGTERM/SIGUSR2 after each step on every rank without agreeing
on it; if the signal reaches the ranks on different steps, one rank stops while the others
wait for it in the next step's all-reduce until ``TIMEOUT``. SLURM signals all tasks of a
job at once, so this is rare; a preempted multi-process run then restarts from its last
periodic checkpoint (``train.checkpoint_interval``).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=10)


def active() -> bool:
    """Whether this process is one rank of an initialised process group of size > 1."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Processes in the group (1 outside a process group)."""
    return dist.get_world_size() if active() else 1


def init_from_slurm() -> None:
    """Initialise the process group of a multi-task SLURM job (gloo on CPU, NCCL on GPU)."""
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("rank %d of %d (%s) on %s", env.rank, env.world_size, backend, env.master_addr)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``batch`` along its first dimension.

    The first dimension must divide evenly, so every rank's mean loss weighs the same and
    DDP's average of the gradients is the gradient of the whole batch's mean loss.
    """
    size = world_size()
    if size == 1:
        return batch
    if len(batch) % size:
        raise ValueError(f"a batch of {len(batch)} sequences does not split over {size} ranks")
    share = len(batch) // size
    return batch[rank() * share : (rank() + 1) * share]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (for logging the whole batch's loss)."""
    if not active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def wrap(model: torch.nn.Module, *, find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when in a process group, else itself.

    ``find_unused``: some parameters may get no gradient in a step (MoE experts that
    receive no token), which DDP must then look for.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=find_unused)

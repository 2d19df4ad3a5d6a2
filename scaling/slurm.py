"""The SLURM executor: one job array per sweep, through submitit.

``submit_sweep`` turns the runs that still need training into the tasks of one job array.
Each task is a ``SlurmRun`` (a ``submitit.helpers.Checkpointable``): it trains its run
through ``scaling.launch.execute_run``, under the same per-run lock file as the local
executor, and stores the row itself, so a failing task loses nothing of the others. On
preemption or time-out SLURM sends USR2; the trainer writes a checkpoint, submitit calls
``checkpoint()`` and requeues the task, which resumes from that checkpoint.

The job ids of every run go to ``SWEEP_DIR/jobs.json``. A later ``scaling run`` asks the
scheduler about them and does not submit a run whose job is still pending or running;
``scaling status`` reads them to show each run's SLURM state. Submission itself holds
``SWEEP_DIR/locks/submit.lock``, so two ``scaling run`` commands never submit the same run.

Before the array, a preflight job checks on a compute node that this package and its
dependencies import at the versions of the submitting host.

NOTE: the run locks are ``flock`` locks on the sweep folder, which must be on a filesystem
that the nodes share and that supports them across machines (NFSv4 does; Lustre needs the
``flock`` mount option).
"""

from __future__ import annotations

import difflib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from scaling.errors import LaunchError

if TYPE_CHECKING:
    from scaling.launch import SweepOutcome
    from scaling.plan import PlannedRun
    from scaling.spec import LaunchSpec

log = logging.getLogger(__name__)

# Long options of sbatch 22.05 (`sbatch --help`), the ones a spec may pass in
# `launch.sbatch`. Options that the spec has a field for, or that submitit sets itself,
# are in the two tables below and are refused with the reason.
SBATCH_OPTIONS = frozenset(
    """account array bb bbf begin chdir cluster-constraint clusters comment constraint
    container contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task
    deadline delay-boot dependency distribution error exclude exclusive export export-file
    extra-node-info get-user-env gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket
    gpus-per-task gres gres-flags hold ignore-pbs input job-name licenses mail-type
    mail-user mcs-label mem mem-per-cpu mem-per-gpu mincpus nice no-kill no-requeue nodefile
    nodelist nodes ntasks ntasks-per-core ntasks-per-node ntasks-per-socket output
    overcommit oversubscribe partition power priority profile propagate qos reboot requeue
    reservation signal sockets-per-node spread-job switches thread-spec threads-per-core
    time time-min tmp uid use-min-nodes wckey""".split()
)
SPEC_FIELDS = {
    "partition": "partition",
    "time": "time_min",
    "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task",
    "gpus-per-node": "gpus_per_node",
    "mem": "mem_gb",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
}
SET_BY_SUBMITIT = frozenset(
    "array output error signal job-name open-mode wckey requeue no-requeue ntasks".split()
)

LIVE_STATES = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_HOLD REQUEUE_FED RESIZING SUSPENDED CONFIGURING "
    "COMPLETING STAGE_OUT SIGNALING".split()
)
RUNNING_STATES = frozenset("RUNNING CONFIGURING COMPLETING STAGE_OUT SIGNALING".split())
# Terminal states after which the run can go on from its checkpoint when submitted again.
INTERRUPTED_STATES = frozenset("PREEMPTED TIMEOUT NODE_FAIL".split())
# Terminal states of a task that ended without storing its run: stored as `failed`.
FAILED_STATES = frozenset("FAILED CANCELLED OUT_OF_MEMORY BOOT_FAIL DEADLINE".split())

PREFLIGHT_TIMEOUT_S = 600
PREFLIGHT_PACKAGES = (
    "scaling", "torch", "numpy", "pandas", "pyarrow", "pydantic", "submitit", "pyyaml",
    "scipy", "lmfit", "click",
)  # fmt: skip
LOG_TAIL_LINES = 20


# --- spec validation ---------------------------------------------------------------------


def check_sbatch_options(options: dict[str, Any]) -> dict[str, Any]:
    """Normalise extra sbatch options (``--x_y`` to ``x-y``) and refuse unknown ones.

    Raises ``ValueError`` (the spec turns it into a ``SpecError`` naming the field) for an
    option sbatch does not know, listing the valid ones, and for one the spec sets itself.
    """
    out = {}
    for key, value in options.items():
        name = key.lstrip("-").replace("_", "-")
        if name in SPEC_FIELDS:
            raise ValueError(f"option '{key}' is set by launch.{SPEC_FIELDS[name]}; use that")
        if name in SET_BY_SUBMITIT:
            raise ValueError(f"option '{key}' is set by the executor itself")
        if name not in SBATCH_OPTIONS:
            valid = sorted(SBATCH_OPTIONS - SPEC_FIELDS.keys() - SET_BY_SUBMITIT)
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"unknown sbatch option '{key}'{hint}; valid options: {', '.join(valid)}"
            )
        out[name] = value
    return out


# --- the cluster -------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """What `sinfo` says about one partition (the largest node of it)."""

    name: str
    default: bool
    cpus: int
    memory_mb: int
    gpus: int
    time_limit_min: float  # inf when unlimited


def _sinfo_time(text: str) -> float:
    """Minutes of a SLURM time limit (``infinite``, ``M``, ``H:M:S``, ``D-H:M:S``)."""
    if text in ("infinite", "UNLIMITED", "n/a"):
        return float("inf")
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def _command(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        raise LaunchError(
            f"launch.executor = 'slurm': `{args[0]}` is not on PATH; run from a machine that "
            "can submit to the cluster"
        )
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(args)}` did not answer within {timeout:.0f} s") from None


def partitions() -> list[Partition]:
    """The cluster's partitions, each with the resources of its largest node."""
    done = _command("sinfo", "-h", "-o", "%P|%c|%m|%G|%l")
    if done.returncode != 0:
        raise LaunchError(f"cannot reach the SLURM cluster: sinfo: {done.stderr.strip()}")
    found: dict[str, Partition] = {}
    for line in done.stdout.splitlines():
        name, cpus, mem, gres, limit = line.strip().split("|")
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        part = Partition(
            name=name.rstrip("*"),
            default=name.endswith("*"),
            cpus=int(cpus.rstrip("+")),
            memory_mb=int(mem.rstrip("+")),
            gpus=gpus,
            time_limit_min=_sinfo_time(limit),
        )
        old = found.get(part.name)
        if old is None or (part.cpus, part.memory_mb, part.gpus) > (old.cpus, old.memory_mb, 0):
            found[part.name] = part
    return list(found.values())


def check_resources(launch: LaunchSpec) -> Partition:
    """Refuse, before submitting, a request that no node of the partition can satisfy."""
    parts = partitions()
    names = ", ".join(p.name for p in parts)
    if launch.partition is None:
        part = next((p for p in parts if p.default), None)
        if part is None:
            raise LaunchError(
                f"launch.partition: not set, and the cluster has no default partition; "
                f"choose one of: {names}"
            )
    else:
        part = next((p for p in parts if p.name == launch.partition), None)
        if part is None:
            raise LaunchError(
                f"launch.partition = {launch.partition!r}: no such partition; valid: {names}"
            )
    cpus = launch.cpus_per_task * launch.tasks_per_node
    if cpus > part.cpus:
        raise LaunchError(
            f"launch.cpus_per_task = {launch.cpus_per_task} x launch.tasks_per_node = "
            f"{launch.tasks_per_node}: {cpus} CPUs per node, but the nodes of partition "
            f"{part.name!r} have at most {part.cpus}"
        )
    if launch.mem_gb is not None and launch.mem_gb * 1024 > part.memory_mb:
        raise LaunchError(
            f"launch.mem_gb = {launch.mem_gb}: more than the {part.memory_mb / 1024:.1f} GB "
            f"of the largest node of partition {part.name!r}"
        )
    if launch.gpus_per_node > part.gpus:
        raise LaunchError(
            f"launch.gpus_per_node = {launch.gpus_per_node}: the nodes of partition "
            f"{part.name!r} have at most {part.gpus} GPUs"
        )
    if launch.time_min > part.time_limit_min:
        raise LaunchError(
            f"launch.time_min = {launch.time_min}: over the time limit of partition "
            f"{part.name!r} ({part.time_limit_min:.0f} min)"
        )
    return part


def make_executor(launch: LaunchSpec, folder: Path, job_name: str) -> submitit.SlurmExecutor:
    """A submitit executor with the sweep's resources; logs and pickles under ``folder``."""
    try:
        executor = submitit.SlurmExecutor(
            folder=folder, max_num_timeout=launch.max_requeues, python=launch.python
        )
    except RuntimeError as exc:  # submitit: no `srun` here
        raise LaunchError(f"launch.executor = 'slurm': {exc}") from None
    params: dict[str, Any] = dict(
        job_name=job_name,
        time=launch.time_min,
        nodes=launch.nodes,
        ntasks_per_node=launch.tasks_per_node,
        cpus_per_task=launch.cpus_per_task,
        array_parallelism=launch.array_parallelism,
        signal_delay_s=launch.signal_delay_s,
        setup=list(launch.setup),
        additional_parameters=dict(launch.sbatch),
    )
    optional = dict(
        partition=launch.partition,
        account=launch.account,
        qos=launch.qos,
        constraint=launch.constraint,
        mem=f"{int(launch.mem_gb * 1024)}MB" if launch.mem_gb else None,
        gpus_per_node=launch.gpus_per_node or None,
    )
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


# --- the scheduler's view ----------------------------------------------------------------


def _expand(job_id: str) -> list[str]:
    """``12_[0-3,5%2]`` (a pending part of an array) to ``12_0 .. 12_3, 12_5``."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if match is None:
        return [job_id]
    array, ranges = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        ids += [f"{array}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each job (``12`` or ``12_3``) that the scheduler knows.

    squeue answers for jobs still in the queue (the controller knows them at once); sacct
    for the ones that have ended (the accounting may learn of a new job a moment late).
    """
    if not job_ids:
        return {}
    wanted = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    done = _command("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", wanted)
    if done.returncode != 0:
        raise LaunchError(f"cannot ask SLURM for job states: sacct: {done.stderr.strip()}")
    states = _parse_states(done.stdout)
    # An unknown id (a job long gone from the queue) makes squeue fail: sacct has those.
    queued = _command("squeue", "-h", "-r", "-o", "%i|%T", "-j", wanted)
    if queued.returncode == 0:
        states.update(_parse_states(queued.stdout))
    return states


def _parse_states(text: str) -> dict[str, str]:
    states = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        job, state = line.split("|", 1)
        for one in _expand(job.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


# --- the sweep's jobs --------------------------------------------------------------------


def jobs_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "jobs.json"


def read_jobs(sweep_dir: Path) -> dict[str, dict]:
    """Run id to its latest job: ``{"job_id", "submitted_at", "log"}``."""
    try:
        return json.loads(jobs_path(sweep_dir).read_text())["runs"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s: unreadable (%s); job ids of earlier submissions are unknown",
                    jobs_path(sweep_dir), exc)  # fmt: skip
        return {}


def _write_jobs(sweep_dir: Path, runs: dict[str, dict]) -> None:
    path = jobs_path(sweep_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1, sort_keys=True))
    tmp.replace(path)


@contextmanager
def submit_lock(sweep_dir: Path) -> Iterator[None]:
    """Held while one `scaling run` decides what to submit and records the job ids."""
    path = Path(sweep_dir) / "locks" / "submit.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_tail(path: str | Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a job's log file, or a note that there is none."""
    if not path:
        return "(no log)"
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.strip().splitlines()[-lines:])


# --- the task on the node ----------------------------------------------------------------


class RunFailed(Exception):
    """Raised in a task after it stored its run as `failed`, so that SLURM marks it so."""


class SlurmRun(submitit.helpers.Checkpointable):
    """One array task: train one run (given as RunSpec JSON) into ``sweep_dir``.

    Checkpointable: on USR2 (preemption, time-out) submitit calls ``checkpoint()``, which
    resubmits the same call; the trainer has written its own checkpoint by then, and the
    requeued task resumes from it.
    """

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir

    def __call__(self, run_json: str) -> str:
        return run_task(run_json, self.sweep_dir)


def run_task(run_json: str, sweep_dir: str) -> str:
    """Body of a task: distributed set-up when the job has several tasks, then train."""
    import torch

    from scaling import distributed
    from scaling.launch import execute_run
    from scaling.spec import RunSpec

    if not logging.getLogger().handlers:  # the task's log file gets the trainer's lines
        level = os.environ.get("SCALING_LOG_LEVEL", "INFO").upper()
        logging.basicConfig(
            level=getattr(logging, level, logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    run = RunSpec.model_validate_json(run_json)
    env = submitit.JobEnvironment()
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if run.train.threads is None and cpus:
        torch.set_num_threads(int(cpus))
    if env.num_tasks > 1:
        distributed.init_from_slurm()
    extra = {"job_id": env.job_id, "slurm_state": "FAILED"}
    status = execute_run(run, Path(sweep_dir), extra=extra)
    if status == "failed":
        raise RunFailed(f"run {run.run_id} failed; its row and error are stored")
    return status


def _preflight_versions() -> dict[str, str]:
    """Python and package versions, after importing what a run imports."""
    import scaling.train  # noqa: F401 - the import itself is part of the check

    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in PREFLIGHT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _preflight_task(expected: dict[str, str]) -> dict[str, Any]:
    return {"host": socket.gethostname(), "versions": _preflight_versions()}


def compare_versions(here: dict[str, str], there: dict[str, str]) -> list[str]:
    """One line per package whose version differs between the two machines."""
    return [
        f"{name}: {here[name]} here, {there.get(name, 'missing')} on the node"
        for name in sorted(here)
        if here[name] != there.get(name, "missing")
    ]


def preflight(executor: submitit.SlurmExecutor, expected: dict[str, str] | None = None) -> None:
    """Run one small job and refuse to launch if the node's versions differ from ours."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    expected = expected or _preflight_versions()
    pre = executor.__class__(
        folder=executor.folder / "preflight",
        max_num_timeout=0,
        python=executor.python,
    )
    params = {k: v for k, v in executor.parameters.items() if k != "map_count"}
    params.update(nodes=1, ntasks_per_node=1, time=min(5, params.get("time", 5)))
    pre.update_parameters(**params)
    job = _submit(pre, _preflight_task, expected)
    log.info("preflight job %s: checking versions on a compute node", job.job_id)
    try:
        answer = job.result()  # NOTE: waits while the job is queued, up to its time limit
    except (FailedJobError, UncompletedJobError) as exc:
        raise LaunchError(
            f"preflight job {job.job_id} failed on the compute node; nothing submitted. "
            f"Check launch.setup and launch.python. Its error:\n{_short(exc)}"
        ) from None
    diffs = compare_versions(expected, answer["versions"])
    if diffs:
        raise LaunchError(
            f"preflight on node {answer['host']}: versions differ from this host "
            f"({', '.join(diffs)}); nothing submitted. Install the same versions in the "
            "nodes' environment (launch.setup, launch.python), or set launch.preflight: false"
        )
    log.info("preflight on %s: versions match", answer["host"])


def _short(exc: BaseException) -> str:
    return "\n".join(str(exc).strip().splitlines()[-LOG_TAIL_LINES:])


def _submit(executor: submitit.SlurmExecutor, fn: Any, *args: Any) -> submitit.Job:
    from submitit.core.utils import FailedJobError

    try:
        return executor.submit(fn, *args)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch refused the job: {_short(exc)}") from None


# --- submitting and waiting --------------------------------------------------------------


def reconcile(sweep_dir: Path, jobs: dict[str, dict], states: dict[str, str]) -> list[str]:
    """Store as `failed` the runs whose task ended in a failed state without storing them.

    Returns their run ids. A task that raised stored its own row; this covers the ones
    killed from outside (cancelled, out of memory, node boot failure).
    """
    from scaling.launch import failed_row
    from scaling.results import read_run, write_run
    from scaling.spec import RunSpec

    stored_now = []
    for run_id, job in jobs.items():
        state = states.get(job["job_id"])
        if state not in FAILED_STATES or read_run(sweep_dir, run_id) is not None:
            continue
        run = RunSpec.model_validate_json(job["spec"])
        error = f"SLURM job {job['job_id']} ended {state}; its log:\n{log_tail(job.get('log'))}"
        write_run(sweep_dir, failed_row(run, error, job_id=job["job_id"], slurm_state=state))
        stored_now.append(run_id)
    return stored_now


def live_runs(jobs: dict[str, dict]) -> tuple[set[str], dict[str, str]]:
    """Run ids whose latest job is pending or running, and the states of all their jobs."""
    states = job_states([j["job_id"] for j in jobs.values()])
    live = {run_id for run_id, j in jobs.items() if states.get(j["job_id"]) in LIVE_STATES}
    return live, states


def submit_sweep(
    launch: LaunchSpec,
    pending: list[PlannedRun],
    sweep_dir: Path,
    outcome: SweepOutcome,
    *,
    retry_failed: bool,
    wait: bool = True,
    show_progress: bool = True,
) -> None:
    """Submit the runs of ``pending`` that no live job holds as one array; then wait."""
    from scaling.launch import stored_status, to_do
    from scaling.status import run_locked

    with submit_lock(sweep_dir):
        jobs = read_jobs(sweep_dir)
        live, states = live_runs(jobs)
        reconcile(sweep_dir, jobs, states)
        # Read the store again under the lock: another `scaling run` may have just finished.
        stored = stored_status(sweep_dir)
        still = to_do(pending, stored, retry_failed)
        outcome.skipped += [p.run.run_id for p in pending if p not in still]
        pending = still
        for p in pending:
            if p.run.run_id in live or run_locked(sweep_dir, p.run.run_id):
                outcome.busy.append(p.run.run_id)
        todo = [p for p in pending if p.run.run_id not in outcome.busy]
        if outcome.busy:
            log.info("%d runs have a live job or are training; not submitted again",
                     len(outcome.busy))  # fmt: skip
        if not todo:
            return
        check_resources(launch)
        executor = make_executor(launch, sweep_dir / "slurm", f"scaling-{outcome.sweep_dir.name}")
        if launch.preflight:
            preflight(executor)
        submitted = _submit_array(executor, todo, sweep_dir)
        for p, job in zip(todo, submitted, strict=True):
            jobs[p.run.run_id] = {
                "job_id": job.job_id,
                "submitted_at": datetime.now(UTC).isoformat(),
                "log": str(job.paths.stderr),
                "spec": p.run.model_dump_json(),
            }
        _write_jobs(sweep_dir, jobs)
    log.info("submitted %d runs as job array %s", len(todo), submitted[0].job_id.split("_")[0])
    outcome.submitted = [p.run.run_id for p in todo]
    if wait:
        wait_for(submitted, todo, sweep_dir, outcome, jobs, show_progress)


def _submit_array(
    executor: submitit.SlurmExecutor, todo: list[PlannedRun], sweep_dir: Path
) -> list[submitit.Job]:
    from submitit.core.utils import FailedJobError

    task = SlurmRun(str(sweep_dir))
    try:
        return executor.map_array(task, [p.run.model_dump_json() for p in todo])
    except FailedJobError as exc:
        raise LaunchError(f"sbatch refused the job array: {_short(exc)}") from None


def wait_for(
    submitted: list[submitit.Job],
    todo: list[PlannedRun],
    sweep_dir: Path,
    outcome: SweepOutcome,
    jobs: dict[str, dict],
    show_progress: bool,
) -> None:
    """Wait for the array's tasks, recording each run's outcome as its task ends."""
    from submitit.helpers import as_completed
    from tqdm.auto import tqdm

    from scaling.launch import _record
    from scaling.results import read_run

    run_of = {job.job_id: p.run.run_id for job, p in zip(submitted, todo, strict=True)}
    with tqdm(total=len(submitted), unit="run", disable=not show_progress) as bar:
        for job in as_completed(submitted, poll_frequency=1.0):
            run_id = run_of[job.job_id]
            try:
                status = job.results()[0]
            except Exception:  # noqa: BLE001 - the task's error is in the store or its log
                status = "failed"
            if status == "failed" and read_run(sweep_dir, run_id) is None:
                states = job_states([job.job_id])
                state = states.get(job.job_id)
                if state not in FAILED_STATES:
                    # Preempted or timed out for good, or lost with its node: not a failure
                    # of the run, which resumes from its checkpoint when submitted again.
                    log.warning("run %s: job %s ended %s without storing it; `scaling run` "
                                "submits it again", run_id, job.job_id, state)  # fmt: skip
                    bar.update(1)
                    continue
                reconcile(sweep_dir, {run_id: jobs[run_id]}, states)
            _record(outcome, run_id, status)
            bar.update(1)

"""Sweep and run specs: one schema, parsed and validated once, before anything runs.

A sweep spec is a YAML file (see ``sweeps/quickstart.yaml``). ``load_sweep`` turns it into a
``SweepSpec``; any unknown key, wrong type or impossible value raises ``SpecError`` naming
the file, the field, the value and the rule. The planner (``scaling.plan``) then resolves it
into ``RunSpec`` objects, one per training run, each with a stable ``run_id``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scaling.errors import SpecError

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataSpec(_Strict):
    """Where tokens come from."""

    corpus: str = "stdlib"
    """``stdlib`` (the running interpreter's standard-library ``.py`` files, as bytes), a
    path to a text file or a folder of text files (bytes), or a ``.bin`` file of tokens."""
    seq_len: PositiveInt = 128
    """Tokens per training sequence (the context length)."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of a pre-tokenized ``.bin`` token file."""
    vocab_size: PositiveInt | None = None
    """Vocabulary of a token file (default: its largest token + 1); bytes use 256."""
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    """Share of the corpus held out for validation (whole files for text corpora)."""
    val_tokens: PositiveInt = 65536
    """Size of the fixed held-out set that every evaluation reads."""
    suffixes: list[str] = [".py", ".txt", ".md", ".rst"]
    """File name endings read when ``corpus`` is a folder."""


class ModelSpec(_Strict):
    """Model family and the rule that turns a target size into a shape."""

    family: Literal["gpt", "moe"] = "gpt"
    """``gpt`` (dense decoder-only) or ``moe`` (Mixture-of-Experts MLPs)."""
    aspect_ratio: PositiveFloat = 32.0
    """d_model / n_layers that the sizing rule keeps close to."""
    head_dim: PositiveInt = 32
    """Width of one attention head; d_model is a whole number of heads."""
    mlp_ratio: PositiveFloat = 4.0
    """d_ff / d_model."""
    tie_embeddings: bool = True
    """Share the token embedding with the output layer."""
    # Mixture-of-Experts (family: moe)
    num_experts: PositiveInt = 8
    """Routed experts per MoE layer."""
    top_k: PositiveInt = 2
    """Experts per token (1 with ``router: switch``)."""
    router: Literal["topk", "switch"] = "topk"
    """``topk``: softmax over all experts, keep the k largest; ``switch``: top-1 with the
    full-softmax probability as gate (Fedus et al. 2021)."""
    normalize_topk: bool = True
    """Renormalise the kept top-k weights to sum to one."""
    moe_every: PositiveInt = 1
    """Every k-th block has an MoE MLP (1: all)."""
    expert_granularity: PositiveInt = 1
    """Split each expert into this many smaller ones (fine-grained experts)."""
    shared_expert: bool = False
    """Add one expert that every token goes through."""
    capacity_factor: PositiveFloat | None = None
    """Tokens an expert takes, as a multiple of an even share; None: no dropping."""
    aux_loss_coef: Annotated[float, Field(ge=0)] = 0.01
    """Weight of the Switch load-balancing loss."""
    z_loss_coef: Annotated[float, Field(ge=0)] = 0.001
    """Weight of the router z-loss."""

    @field_validator("top_k")
    @classmethod
    def _top_k_fits(cls, value: int, info: Any) -> int:
        experts = info.data.get("num_experts")
        if experts is not None and value > experts:
            raise ValueError(f"top_k={value} is more than num_experts={experts}")
        return value


class TrainSpec(_Strict):
    """Optimiser, schedule and evaluation of every run in the sweep."""

    batch_tokens: PositiveInt = 4096
    """Tokens per optimiser step (a multiple of seq_len)."""
    micro_batch_tokens: PositiveInt | None = None
    """Tokens per forward pass when accumulating gradients (default: the whole batch)."""
    lr: PositiveFloat = 3.0e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Final learning rate as a share of the peak."""
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    """Warm-up, then cosine decay to the run's own budget, constant, or warm-up-stable-decay."""
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.02
    """Share of the steps spent warming up linearly from zero."""
    cooldown_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2
    """Share of the steps of the final linear decay in the ``wsd`` schedule."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    """AdamW weight decay on matrices (not on norms or embeddings)."""
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seeds initialisation and batch order."""
    eval_points: PositiveInt = 8
    """Validation evaluations, log-spaced over the run, the last at the end."""
    log_interval: PositiveInt = 50
    """Steps between log lines and curve rows."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Matmul precision: fp32, or bf16 autocast with fp32 weights."""
    threads: PositiveInt | None = None
    """torch threads per run (default: cores / workers)."""
    checkpoint_interval: Annotated[int, Field(ge=0)] = 0
    """Steps between checkpoints (0: only on SIGTERM/SIGUSR2)."""


class GridPlan(_Strict):
    """Every model size with every token count."""

    kind: Literal["grid"]
    params: list[PositiveFloat] = Field(min_length=1)
    """Target model sizes N."""
    tokens: list[PositiveFloat] = Field(min_length=1)
    """Training tokens D."""


class IsoflopPlan(_Strict):
    """IsoFLOP profiles: for each compute budget, several sizes, D = C / (k N)."""

    kind: Literal["isoflop"]
    compute: list[PositiveFloat] = Field(min_length=1)
    """Compute budgets C in FLOPs."""
    sizes_per_budget: Annotated[int, Field(ge=2)] = 5
    """Model sizes per budget, log-spaced."""
    tokens_per_param: tuple[PositiveFloat, PositiveFloat] = (5.0, 200.0)
    """Range of D/N that the sizes of each budget span (smallest N at the high ratio)."""
    params: list[PositiveFloat] | None = None
    """Explicit sizes for every budget instead of the ratio range."""


class RatioPlan(_Strict):
    """A fixed number of tokens per parameter, over sizes or over budgets."""

    kind: Literal["ratio"]
    tokens_per_param: list[PositiveFloat] = Field(min_length=1)
    """D/N ratios (20 is Chinchilla's rule of thumb)."""
    params: list[PositiveFloat] | None = None
    """Model sizes N (give these or ``compute``)."""
    compute: list[PositiveFloat] | None = None
    """Compute budgets C (give these or ``params``)."""


PlanSpec = Annotated[GridPlan | IsoflopPlan | RatioPlan, Field(discriminator="kind")]


class LaunchSpec(_Strict):
    """Where runs execute, and what a SLURM job of the sweep asks for.

    The SLURM fields matter only with ``executor: slurm``; each run of the sweep is one
    task of a single job array (see ``scaling.slurm``).
    """

    executor: Literal["local", "slurm"] = "local"
    """``local`` (this machine) or ``slurm`` (through submitit)."""
    workers: PositiveInt = 1
    """Local worker processes (1: run in this process, one after another)."""
    partition: str | None = None
    """SLURM partition (default: the cluster's default partition)."""
    time_min: PositiveInt = 60
    """Time limit of one job, in minutes; a run that needs longer is requeued and resumes."""
    nodes: PositiveInt = 1
    """Nodes per run (more than one: the run trains with torch.distributed)."""
    tasks_per_node: PositiveInt = 1
    """Processes per node (more than one: the run trains with torch.distributed)."""
    cpus_per_task: PositiveInt = 1
    """CPUs per process; torch uses as many threads unless ``train.threads`` says otherwise."""
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    """GPUs per node."""
    mem_gb: PositiveFloat | None = None
    """Memory per node in GB (default: the partition's default)."""
    account: str | None = None
    """Account charged for the jobs."""
    qos: str | None = None
    """Quality of service."""
    constraint: str | None = None
    """Node features the jobs require (sbatch ``--constraint``)."""
    sbatch: dict[str, str | int | float | bool] = {}
    """Further sbatch long options, without the dashes (e.g. ``{reservation: r1}``)."""
    setup: list[str] = []
    """Shell lines run on the node before the task (module loads, environment activation)."""
    python: str | None = None
    """Python command on the nodes (default: the interpreter that submits)."""
    array_parallelism: PositiveInt = 64
    """Tasks of the sweep's array that may run at once."""
    max_requeues: Annotated[int, Field(ge=0)] = 3
    """Time-outs after which a run is no longer requeued (preemptions are not counted)."""
    signal_delay_s: PositiveInt = 90
    """Seconds before the time limit at which SLURM sends USR2: the run checkpoints and is
    requeued."""
    preflight: bool = True
    """Before submitting, run one small job that checks that the nodes import this package
    and its dependencies at the versions of the submitting host."""

    @field_validator("sbatch")
    @classmethod
    def _known_sbatch_options(cls, value: dict) -> dict:
        from scaling.slurm import check_sbatch_options

        return check_sbatch_options(value)

    @field_validator("partition", "account", "qos", "constraint", "python")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave it out for the default)")
        return value


class SweepSpec(_Strict):
    """A whole sweep: data, model family, training recipe, plan and launch."""

    name: str
    """Sweep name: the folder under the results root."""
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    plan: PlanSpec
    flops: Literal["6n", "shape", "kaplan"] = "6n"
    """FLOP convention that turns budgets into tokens: ``6n`` (C = 6ND), ``shape`` (counted
    from the shapes) or ``kaplan``; all three are stored with every run."""
    size_by: Literal["params", "params_nonembedding"] = "params"
    """Which count the planner matches to target sizes (MoE uses the active count)."""
    launch: LaunchSpec = LaunchSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder)")
        return value


class RunSpec(_Strict):
    """One resolved training run: everything the trainer needs, nothing left to choose."""

    sweep: str
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    shape: dict[str, Any]
    """``ModelShape`` fields of the model."""
    steps: PositiveInt
    """Optimiser steps; tokens = steps * batch_tokens."""
    tokens: PositiveInt
    target_params: float
    """Size the planner asked for (the achieved one is in the counts)."""
    target_compute: float | None = None
    """Budget the run belongs to (IsoFLOP and ratio-over-compute plans)."""
    flops: Literal["6n", "shape", "kaplan"] = "6n"
    branches: list[PositiveInt] = []
    """WSD cooldown branch (``schedule: wsd`` with a grid plan): the ``steps`` of every run
    that branches off the same stable-phase trunk, this one's among them (``scaling.wsd``);
    empty for a run trained on its own."""

    @property
    def run_id(self) -> str:
        """A stable hash of everything that changes what the run computes."""
        exclude = {"sweep", "target_params", "target_compute"}
        if not self.branches:
            exclude.add("branches")  # runs without branches keep the ids they always had
        payload = self.model_dump(mode="json", exclude=exclude)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _format_error(source: str, err: dict) -> str:
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    if len(loc) > 1 and loc[0] == "plan" and loc[1] in ("grid", "isoflop", "ratio"):
        loc.pop(1)  # the discriminator tag pydantic inserts for the plan union
    field = ".".join(loc)
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{field}'"
    if kind == "missing":
        return f"{source}: missing required field '{field}'"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{source}: field '{field}' = {shown}: {err['msg']}"


def parse_sweep(raw: Any, source: str = "<spec>") -> SweepSpec:
    """Validate a sweep spec given as a mapping; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a sweep spec must be a mapping, got {type(raw).__name__}")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(source, e) for e in exc.errors()]
        raise SpecError("\n".join(lines)) from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec from a YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: sweep spec not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the sweep spec ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return parse_sweep(raw, str(path))

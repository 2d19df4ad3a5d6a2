"""Mixture-of-Experts MLP: a router, routed experts, an optional shared expert.

``MoEMLP`` replaces the dense MLP of the blocks where ``ModelShape.is_moe_layer`` holds. It
returns the block output and the per-layer auxiliary values (``aux_loss``, ``z_loss``,
``dropped_fraction``); the GPT averages the losses over its MoE layers and adds them with the
spec's ``aux_loss_coef`` and ``z_loss_coef``.

The parameter layout is the one ``scaling.model.count`` counts: a router ``d_model x
num_experts`` without bias; each expert an MLP ``d_model -> d_expert -> d_model`` (GELU, no
biases), stored stacked as ``w_up [E, d_model, d_expert]`` and ``w_down [E, d_expert,
d_model]``; and, with ``shared_expert``, one more expert of the same size that every token
goes through. ``num_experts`` is the total of routed experts (fine-grained experts are
already counted in it) and ``d_expert = d_ff // expert_granularity``.

Dispatch computes only the chosen experts: the token assignments are sorted by expert, each
expert runs on its contiguous slice of tokens (a loop over experts, two matmuls each), and
the outputs are added back to their tokens weighted by the gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.model.count import ModelShape
from scaling.spec import ModelSpec

# GPT-2's initialisation (Radford et al. 2019; as in nanoGPT): weights N(0, 0.02), and the
# projections that write into the residual stream scaled by 1 / sqrt(2 * n_layers).
INIT_STD = 0.02

# The router starts near uniform: Switch Transformer (Fedus et al. 2021, section 2.4)
# recommends a ten times smaller initialisation scale (variance) for stable routing; we
# apply it to GPT-2's std, on the router only.
ROUTER_INIT_STD = INIT_STD * math.sqrt(0.1)


def load_balancing_loss(probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss, ``num_experts * sum_i f_i * P_i``.

    Fedus et al. 2021, equation 4, extended to top-k: ``f_i`` is the share of token
    assignments routed to expert ``i`` (each token's k choices counted, so ``f`` sums to one)
    and ``P_i`` the mean router probability of expert ``i``. It is 1 for perfectly even
    routing and ``num_experts`` when every token goes to one expert with probability one.

    Parameters
    ----------
    probs
        Router probabilities ``[..., num_experts]`` (softmax over all experts).
    expert_index
        Chosen experts ``[..., k]`` (or ``[...]`` for one choice), integers.
    num_experts
        Number of routed experts.

    Returns
    -------
    Tensor
        A scalar; gradient flows through ``probs`` only.
    """
    choices = expert_index.reshape(-1)
    counts = torch.bincount(choices, minlength=num_experts).to(probs.dtype)
    fraction = counts / max(1, choices.numel())
    mean_prob = probs.reshape(-1, num_experts).mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss: the mean over tokens of ``logsumexp(logits) ** 2``.

    ST-MoE (Zoph et al. 2022, equation 5); it keeps router logits small, which keeps the
    softmax stable in low precision.
    """
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(
    capacity_factor: float | None, tokens: int, top_k: int, experts: int
) -> int | None:
    """Assignments one expert takes: ``ceil(capacity_factor * tokens * top_k / experts)``.

    ``None`` (no capacity factor) means no limit.
    """
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / experts)


def dispatch_order(
    expert_index: Tensor, num_experts: int, capacity: int | None
) -> tuple[Tensor, Tensor]:
    """Kept token assignments, sorted by expert, and how many each expert takes.

    Assignments are numbered choice-major, ``a = choice * N + token`` for ``expert_index
    [N, k]``, so that a stable sort by expert puts every token's first choice ahead of any
    second choice: when an expert is over ``capacity`` it keeps first choices, earlier tokens
    first, and drops the rest (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021).

    Returns
    -------
    order
        Kept assignment numbers ``[M]``, grouped by expert in expert order (``a % N`` is the
        token, ``a // N`` the choice).
    kept_counts
        Kept assignments per expert ``[num_experts]``; they sum to ``M``.
    """
    flat_expert = expert_index.t().reshape(-1)  # [k * N], choice-major
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts)
    if capacity is None or not bool((counts > capacity).any()):
        return order, counts

    # Rank of each assignment within its expert's group; keep the first `capacity`.
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
    return order[rank < capacity], counts.clamp(max=capacity)


def _expert_mlp(x: Tensor, w_up: Tensor, w_down: Tensor, counts: list[int]) -> Tensor:
    """Run expert ``e`` on rows ``x[sum(counts[:e]) : sum(counts[:e + 1])]``.

    ``x`` is ``[M, d_model]`` sorted by expert; returns ``[M, d_model]`` in the same order.
    Experts with no rows are skipped (their weights get a zero gradient).
    """
    # NOTE: a loop of plain matmuls, one pair per expert, on any device and dtype. Measured
    # on CPU (8 experts, top-2, 4096 tokens, d_model 128 and 256, forward + backward, one
    # thread, against a dense MLP of the same active size): this loop 0.9-1.1x the dense
    # time, torch's `grouped_mm` 1.1x (it loops the same way on CPU and needs 16-byte
    # aligned strides), a padded batched matmul 1.15-1.35x.
    outputs = []
    for chunk, up, down in zip(x.split(counts), w_up.unbind(0), w_down.unbind(0), strict=True):
        if chunk.shape[0]:
            outputs.append(F.gelu(chunk @ up) @ down)
    if not outputs:
        return x.new_zeros(0, w_down.shape[-1])
    return torch.cat(outputs)


class MoEMLP(nn.Module):
    """Mixture-of-Experts MLP with top-k or Switch routing and capacity-based dropping.

    Parameters
    ----------
    shape
        Model shape: ``d_model``, ``d_expert`` (``d_ff // expert_granularity``),
        ``num_experts`` (all routed experts), ``top_k``, ``shared_expert``, ``n_layers``
        (for the initialisation).
    spec
        Model spec: ``router``, ``normalize_topk`` and ``capacity_factor``.
    """

    def __init__(self, shape: ModelShape, spec: ModelSpec) -> None:
        super().__init__()
        if shape.num_experts < 1:
            raise ValueError(f"num_experts={shape.num_experts}: an MoE layer needs an expert")
        if not 1 <= shape.top_k <= shape.num_experts:
            raise ValueError(
                f"top_k={shape.top_k}: must be between 1 and num_experts={shape.num_experts}"
            )
        if spec.router == "switch" and shape.top_k != 1:
            raise ValueError(f"top_k={shape.top_k}: router 'switch' sends each token to 1 expert")
        if spec.capacity_factor is not None and spec.capacity_factor < 0:
            raise ValueError(f"capacity_factor={spec.capacity_factor}: must be >= 0 or None")

        self.d_model = shape.d_model
        self.d_expert = shape.d_expert
        self.num_experts = shape.num_experts
        self.top_k = shape.top_k
        self.router_kind = spec.router
        self.normalize_topk = spec.normalize_topk
        self.capacity_factor = spec.capacity_factor

        d, h, e = shape.d_model, shape.d_expert, shape.num_experts
        self.router = nn.Linear(d, e, bias=False)
        self.w_up = nn.Parameter(torch.empty(e, d, h))  # [E, d_model, d_expert]
        self.w_down = nn.Parameter(torch.empty(e, h, d))  # [E, d_expert, d_model]
        if shape.shared_expert:
            self.shared_up: nn.Linear | None = nn.Linear(d, h, bias=False)
            self.shared_down: nn.Linear | None = nn.Linear(h, d, bias=False)
        else:
            self.shared_up = self.shared_down = None
        self.reset_parameters(shape.n_layers)

    def reset_parameters(self, n_layers: int) -> None:
        """GPT-2 initialisation; down projections scaled by ``1 / sqrt(2 * n_layers)``."""
        down_std = INIT_STD / math.sqrt(2 * max(1, n_layers))
        nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
        nn.init.normal_(self.w_up, std=INIT_STD)
        nn.init.normal_(self.w_down, std=down_std)
        if self.shared_up is not None and self.shared_down is not None:
            nn.init.normal_(self.shared_up.weight, std=INIT_STD)
            nn.init.normal_(self.shared_down.weight, std=down_std)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Route tokens ``x [N, d_model]``.

        Returns the router probabilities ``[N, E]`` (softmax over all experts), the
        log-partition ``logsumexp(logits)`` ``[N]``, the chosen experts ``[N, k]`` (largest
        probability first) and their gates ``[N, k]``.
        """
        # The router runs in fp32 even under autocast: small logit errors flip choices.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())

        # Softmax through the log-partition, which the z-loss reuses (and which is faster
        # on CPU than torch.softmax over a last dimension this short).
        log_z = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - log_z.unsqueeze(-1))
        gates, expert_index = torch.topk(probs, self.top_k, dim=-1)

        # Switch keeps the full-softmax probability of its one expert as the gate, so the
        # router learns from the task loss (Fedus et al. 2021, section 2.1).
        if self.router_kind == "topk" and self.normalize_topk:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, log_z, expert_index, gates

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mix the experts for every token of ``x [B, T, d_model]``.

        Returns the output ``[B, T, d_model]`` and a dict of scalar tensors of this layer:
        ``aux_loss`` (Switch load balancing), ``z_loss`` (router z-loss) and
        ``dropped_fraction`` (assignments over capacity / all assignments, no gradient).
        """
        x_flat = x.reshape(-1, self.d_model)  # [N, d]
        n_tokens, n_assign = x_flat.shape[0], x_flat.shape[0] * self.top_k

        probs, log_z, expert_index, gates = self.route(x_flat)
        capacity = expert_capacity(self.capacity_factor, n_tokens, self.top_k, self.num_experts)
        order, kept_counts = dispatch_order(expert_index, self.num_experts, capacity)
        stats = {
            "aux_loss": load_balancing_loss(probs, expert_index, self.num_experts),
            "z_loss": log_z.square().mean(),  # router_z_loss(logits)
            "dropped_fraction": torch.tensor(
                (n_assign - order.numel()) / max(1, n_assign), device=x.device
            ),
        }

        # Gather the kept assignments' tokens (sorted by expert), run each expert on its
        # slice, and add the gated outputs back to their tokens.
        out = torch.zeros_like(x_flat)
        if order.numel():
            token = order % n_tokens
            gate = gates.t().reshape(-1)[order].unsqueeze(-1)  # [M, 1]
            expert_out = _expert_mlp(
                x_flat.index_select(0, token), self.w_up, self.w_down, kept_counts.tolist()
            )
            out = out.index_add_(0, token, (expert_out * gate.to(expert_out.dtype)).to(out.dtype))

        if self.shared_up is not None and self.shared_down is not None:
            out = out + self.shared_down(F.gelu(self.shared_up(x_flat))).to(out.dtype)
        return out.reshape(x.shape), stats

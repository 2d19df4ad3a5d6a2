"""Parameter and FLOP accounting, from the model's shape alone.

This is the one place where sizes and compute are derived; the planner, the trainer and the
fitter all call it, and `tests/model/test_count.py` checks it against hand counts and
against the built modules.

Conventions (all per token):

- ``params``: every parameter, embeddings included (the default N of fits; Hoffmann et
  al. 2022 count this way).
- ``params_nonembedding``: without the token and position embeddings and without an untied
  output matrix (Kaplan et al. 2020, section 2.1).
- ``params_active``: what one token uses (shared weights, k experts and the router for MoE;
  equal to ``params`` for a dense model).
- ``flops_per_token``: forward plus backward, counted from the shapes: backward is twice the
  forward, every matmul (2 FLOPs per multiply-add) including the output layer and the MoE
  router, and the attention scores and weighted values over the full ``seq_len x seq_len``
  matrix, as dense attention kernels compute it (Hoffmann et al. 2022, appendix F, count
  attention the same way). The causal mask makes half of that useful work;
  ``attention_flops_causal`` states it. Embedding look-ups, norms, softmax and the residual
  adds are not counted (under 1% at the sizes planned here).
- ``flops_6n``: ``6 * params_active`` (Chinchilla's C = 6ND).
- ``flops_kaplan``: ``6 * params_nonembedding + 6 * n_layers * seq_len * d_model`` (Kaplan et
  al. 2020, table 1, with the attention context term).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FLOP_CONVENTIONS = ("6n", "shape", "kaplan")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer, dense or Mixture-of-Experts."""

    vocab_size: int
    """Tokens in the vocabulary (256 for byte corpora)."""
    seq_len: int
    """Context length; also the number of learned positions."""
    n_layers: int
    """Transformer blocks."""
    d_model: int
    """Residual stream width."""
    n_heads: int
    """Attention heads; ``d_model // n_heads`` is the head dimension."""
    d_ff: int
    """Hidden width of the dense MLP (and of each expert before granularity)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer."""
    family: str = "gpt"
    """``gpt`` (dense) or ``moe``."""
    num_experts: int = 0
    """Routed experts per MoE layer (``family == "moe"``)."""
    top_k: int = 0
    """Experts each token is sent to."""
    moe_every: int = 1
    """Every k-th block (counting from the last) has an MoE MLP; the others stay dense."""
    expert_granularity: int = 1
    """Each expert has ``d_ff // expert_granularity`` hidden units."""
    shared_expert: bool = False
    """One extra expert that every token goes through."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_expert(self) -> int:
        return self.d_ff // max(1, self.expert_granularity)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) carries an MoE MLP."""
        if self.family != "moe":
            return False
        return (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Counts:
    """Sizes and per-token compute of one model shape."""

    params: int
    params_nonembedding: int
    params_active: int
    params_embedding: int
    flops_per_token: float
    flops_forward: float
    attention_flops_causal: float
    flops_6n: float
    flops_kaplan: float

    def flops(self, convention: str) -> float:
        """FLOPs per trained token under ``convention`` (one of ``FLOP_CONVENTIONS``)."""
        return {"6n": self.flops_6n, "shape": self.flops_per_token, "kaplan": self.flops_kaplan}[
            convention
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp_params(d_model: int, d_hidden: int) -> int:
    # up (d_model -> d_hidden) and down (d_hidden -> d_model), no biases
    return 2 * d_model * d_hidden


def count(shape: ModelShape) -> Counts:
    """Count parameters and FLOPs per token of ``shape``.

    Layout counted (and built by ``scaling.model.gpt``): token and learned position
    embeddings; per block a pre-norm LayerNorm (weight only), fused QKV and output
    projections without biases, a second LayerNorm and an MLP (GELU, no biases), or for MoE
    blocks a router (``d_model x num_experts``) with experts of ``d_expert`` hidden units;
    a final LayerNorm; an output layer, tied to the token embedding unless
    ``tie_embeddings`` is false.
    """
    d, L, V, T = shape.d_model, shape.n_layers, shape.vocab_size, shape.seq_len
    attn = 4 * d * d  # QKV (3 d^2) and output projection (d^2)
    norms = 2 * d

    dense_mlp = _mlp_params(d, shape.d_ff)
    expert = _mlp_params(d, shape.d_expert)
    n_moe = shape.n_moe_layers
    n_dense = L - n_moe
    router = d * shape.num_experts
    n_shared = 1 if shape.shared_expert else 0
    moe_all = router + (shape.num_experts + n_shared) * expert
    moe_active = router + (shape.top_k + n_shared) * expert

    blocks_all = L * (attn + norms) + n_dense * dense_mlp + n_moe * moe_all
    blocks_active = L * (attn + norms) + n_dense * dense_mlp + n_moe * moe_active
    final_norm = d
    embedding = V * d + T * d
    head = 0 if shape.tie_embeddings else V * d

    params = embedding + blocks_all + final_norm + head
    params_active = embedding + blocks_active + final_norm + head
    params_nonembedding = blocks_all + final_norm

    # Forward FLOPs per token: 2 per multiply-add of every matmul on the active path.
    matmul = L * attn + n_dense * dense_mlp + n_moe * moe_active + V * d  # output layer
    attention_full = L * 4 * T * d  # scores (2 T d) and weighted values (2 T d)
    attention_causal = L * 2 * (T + 1) * d  # the same over the (T + 1) / 2 unmasked keys
    forward = 2 * matmul + attention_full

    active_nonembedding = blocks_active + final_norm
    return Counts(
        params=params,
        params_nonembedding=params_nonembedding,
        params_active=params_active,
        params_embedding=embedding + head,
        flops_per_token=3.0 * forward,
        flops_forward=float(forward),
        attention_flops_causal=3.0 * attention_causal,
        flops_6n=6.0 * params_active,
        flops_kaplan=6.0 * active_nonembedding + 6.0 * L * T * d,
    )


def shape_for_params(
    target: float,
    *,
    vocab_size: int,
    seq_len: int,
    aspect_ratio: float,
    head_dim: int,
    mlp_ratio: float = 4.0,
    tie_embeddings: bool = True,
    by: str = "params",
    **moe: int | bool | str,
) -> ModelShape:
    """The shape whose size is closest (in log) to ``target``.

    Width is a whole number of heads. For each width, depth is ``d_model / aspect_ratio``
    rounded down or up (at least one block), so that ``d_model / n_layers`` stays near
    ``aspect_ratio``; taking both roundings gives a ladder of sizes about 1.3x apart even
    for the smallest models, where whole heads are a coarse step. Of two shapes equally
    close in size, the one nearer the aspect ratio wins. ``by`` names the count that is
    matched (``params``, ``params_active`` or ``params_nonembedding``). Extra keyword
    arguments are MoE fields of ``ModelShape``.
    """
    if target <= 0:
        raise ValueError(f"target size must be positive, got {target}")
    best: tuple[float, float, ModelShape] | None = None
    d_model = head_dim
    while True:
        depths = {
            max(1, math.floor(d_model / aspect_ratio)),
            max(1, math.ceil(d_model / aspect_ratio)),
        }
        sizes = []
        for n_layers in sorted(depths):
            shape = ModelShape(
                vocab_size=vocab_size,
                seq_len=seq_len,
                n_layers=n_layers,
                d_model=d_model,
                n_heads=d_model // head_dim,
                d_ff=int(round(mlp_ratio * d_model)),
                tie_embeddings=tie_embeddings,
                **moe,
            )
            size = getattr(count(shape), by)
            sizes.append(size)
            gap = abs(math.log(size / target))
            skew = abs(math.log(d_model / n_layers / aspect_ratio))
            if best is None or (gap, skew) < best[:2]:
                best = (gap, skew, shape)
        if min(sizes) > target:
            return best[2]
        d_model += head_dim

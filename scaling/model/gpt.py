"""A decoder-only GPT, dense or with Mixture-of-Experts MLPs, built from a ``ModelShape``.

The layout is exactly the one ``scaling.model.count`` counts (``tests/model/test_gpt.py``
checks parameter for parameter): token and learned position embeddings; per block a
pre-norm LayerNorm (weight only), fused QKV and output projections without biases, causal
attention through ``scaled_dot_product_attention``, a second LayerNorm and a GELU MLP
without biases (or an MoE MLP from ``scaling.model.moe`` on the blocks where
``shape.is_moe_layer(i)``); a final LayerNorm; an output layer tied to the token embedding
unless ``shape.tie_embeddings`` is false.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.model.count import ModelShape
from scaling.spec import ModelSpec

# GPT-2 initialisation (Radford et al. 2019, section 2.3, and its released code): weights
# from N(0, 0.02), residual-stream projections scaled by 1/sqrt(2 * n_layers) because each
# block adds two of them to the residual stream.
INIT_STD = 0.02

MOE_STATS = ("aux_loss", "z_loss", "dropped_fraction")


# NOTE: torch's CPU flash-attention kernel is slow in bf16, backward above all: a whole
# forward and backward of a dense GPT (32 x 128 tokens, head_dim 32) under bf16 autocast took
# 275 ms at d_model 128 and 1130 ms at d_model 256 with it, against 130 ms and 550 ms with
# `causal_attention_math` (torch 2.13, 2-core Xeon with AMX, interleaved runs). The math form
# keeps a [B * heads, T, T] score matrix for the backward, so it is used only up to this
# context length (where that matrix is small) and only on CPU in bf16.
MATH_ATTENTION_MAX_T = 512


def causal_attention_math(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention as two batched matmuls and a softmax.

    ``q``, ``k``, ``v`` are ``[B, H, T, head_dim]``; returns ``[B, H, T, head_dim]`` in
    their dtype. Computes what ``scaled_dot_product_attention(q, k, v, is_causal=True)``
    does, over the full ``T x T`` score matrix.
    """
    B, H, T, hd = q.shape
    mask = torch.full((T, T), float("-inf"), device=q.device).triu(1).to(q.dtype)
    scores = torch.baddbmm(  # [B * H, T, T], masked above the diagonal
        mask.expand(B * H, T, T),
        q.reshape(B * H, T, hd),
        k.reshape(B * H, T, hd).transpose(1, 2),
        alpha=hd**-0.5,
    )
    # In bf16 torch's CPU softmax accumulates in fp32 and rounds once: the same result as
    # an fp32 softmax cast back, without the two copies of [B * H, T, T] (measured: 17%
    # of the whole forward and backward at d_model 256).
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(B * H, T, hd)).view(B, H, T, hd)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection and no biases."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.n_heads = shape.n_heads
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        # [B, T, 3d] -> three [B, H, T, d/H]
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and T <= MATH_ATTENTION_MAX_T:
            y = causal_attention_math(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """Dense feed-forward block: up-projection, GELU, down-projection, no biases."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.up = nn.Linear(shape.d_model, shape.d_ff, bias=False)
        self.down = nn.Linear(shape.d_ff, shape.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block; ``stats`` of an MoE MLP are returned beside the output."""

    def __init__(self, shape: ModelShape, spec: ModelSpec, moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.d_model, bias=False)
        self.attn = CausalSelfAttention(shape)
        self.ln2 = nn.LayerNorm(shape.d_model, bias=False)
        self.moe = moe
        if moe:
            from scaling.model.moe import MoEMLP  # only MoE models need it

            self.mlp: nn.Module = MoEMLP(shape, spec)
        else:
            self.mlp = MLP(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
        x = x + self.attn(self.ln1(x))
        if self.moe:
            out, stats = self.mlp(self.ln2(x))
            return x + out, stats
        return x + self.mlp(self.ln2(x)), None


class GPT(nn.Module):
    """Decoder-only transformer of ``shape``; ``spec`` carries the MoE options and loss
    coefficients (its defaults when omitted)."""

    def __init__(self, shape: ModelShape, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.spec = spec if spec is not None else ModelSpec(family=shape.family)
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.seq_len, shape.d_model)
        self.blocks = nn.ModuleList(
            Block(shape, self.spec, shape.is_moe_layer(i)) for i in range(shape.n_layers)
        )
        self.ln_f = nn.LayerNorm(shape.d_model, bias=False)
        self.head = None
        if not shape.tie_embeddings:
            self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.register_buffer("positions", torch.arange(shape.seq_len), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation of the modules built here (an MoE MLP initialises itself)."""
        residual_std = INIT_STD / math.sqrt(2 * self.shape.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=INIT_STD)
        nn.init.normal_(self.pos_emb.weight, std=INIT_STD)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=INIT_STD)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=INIT_STD)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            if not block.moe:
                nn.init.normal_(block.mlp.up.weight, std=INIT_STD)
                nn.init.normal_(block.mlp.down.weight, std=residual_std)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Logits ``[B, T, vocab]``, the training loss, and statistics.

        The loss is the mean cross-entropy plus, for MoE models, ``aux_loss_coef * aux_loss
        + z_loss_coef * z_loss`` (each averaged over the MoE layers); ``stats["ce_loss"]`` is
        the cross-entropy alone (what is reported as the loss), and ``aux_loss``, ``z_loss``
        and ``dropped_fraction`` (MoE only) are the layer averages, detached.
        """
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(self.positions[:T])  # [B, T, d]
        moe_stats: list[dict[str, Tensor]] = []
        for block in self.blocks:
            x, block_stats = block(x)
            if block_stats is not None:
                moe_stats.append(block_stats)
        x = self.ln_f(x)
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        logits = F.linear(x, weight)  # [B, T, V]

        stats: dict[str, Tensor] = {}
        if moe_stats:
            for name in MOE_STATS:
                stats[name] = torch.stack([s[name] for s in moe_stats]).float().mean()
        if targets is None:
            return logits, None, {k: v.detach() for k, v in stats.items()}

        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss = ce
        if moe_stats:
            loss = (
                ce
                + self.spec.aux_loss_coef * stats["aux_loss"]
                + self.spec.z_loss_coef * stats["z_loss"]
            )
        stats = {k: v.detach() for k, v in stats.items()}
        stats["ce_loss"] = ce.detach()
        return logits, loss, stats

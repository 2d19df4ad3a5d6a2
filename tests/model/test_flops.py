"""FLOP accounting: ``count()`` against torch's FlopCounterMode, and the three conventions.

``flops_per_token`` is counted from the shapes alone; here a real forward and backward pass
of a small dense and a small MoE model is counted by ``torch.utils.flop_counter`` and the
two must agree within 2%. Then every stored run carries all three conventions (counted
shapes, 6N, Kaplan), and the spec's ``flops`` choice is what turns budgets into tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaling.model.count import ModelShape, count
from scaling.model.gpt import GPT
from scaling.plan import plan_sweep
from scaling.results import load_runs
from scaling.spec import DataSpec, ModelSpec, RunSpec, TrainSpec, parse_sweep
from scaling.train import train_run

BATCH, SEQ_LEN = 4, 32


def _shape(**kwargs: object) -> ModelShape:
    base = dict(vocab_size=256, seq_len=SEQ_LEN, n_layers=2, d_model=64, n_heads=2, d_ff=256)
    base.update(kwargs)
    return ModelShape(**base)


def _measured_flops_per_token(model: GPT) -> float:
    """FLOPs of one forward and backward pass as FlopCounterMode counts them, per token."""
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (BATCH, SEQ_LEN))
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for the fused CPU attention kernel (it counts it as
    # zero); the MATH backend computes the same attention as two batched matmuls over the
    # full T x T score matrix, which is counted, and which is what count.py counts.
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss, _ = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / idx.numel()


def test_dense_flops_match_flop_counter() -> None:
    shape = _shape()
    measured = _measured_flops_per_token(GPT(shape))
    # Both sides count 2 FLOPs per multiply-add of every matmul (QKV, attention output, MLP,
    # output layer), the T x T attention scores and weighted values, and twice the forward
    # for the backward (gradients of inputs and of weights). Neither counts embedding
    # look-ups, LayerNorm, GELU, softmax, residual adds or the loss, so they agree exactly
    # here; the contract is 2%.
    assert measured == pytest.approx(count(shape).flops_per_token, rel=0.02)
    assert measured == count(shape).flops_per_token


@pytest.mark.parametrize(("num_experts", "top_k", "moe_every"), [(8, 2, 1), (4, 1, 2)])
def test_moe_flops_match_flop_counter(num_experts: int, top_k: int, moe_every: int) -> None:
    shape = _shape(family="moe", num_experts=num_experts, top_k=top_k, moe_every=moe_every)
    spec = ModelSpec(family="moe", num_experts=num_experts, top_k=top_k, capacity_factor=None)
    model = GPT(shape, spec)
    measured = _measured_flops_per_token(model)
    # Per MoE layer count.py counts the router matmul (d_model x num_experts, every token)
    # and k experts per token. FlopCounterMode sees the router's F.linear and one pair of
    # matmuls per expert on that expert's own tokens: however unevenly the router splits
    # them, the expert matmuls add up to k * tokens rows when nothing is dropped (no
    # capacity factor). The gathers, the scatter-add of the gated outputs, top-k, the
    # softmax and the balancing and z losses are not matmuls: neither side counts them.
    # The router's backward is counted too: it gets gradients through the gates and the
    # auxiliary losses, like every other matmul.
    assert measured == pytest.approx(count(shape).flops_per_token, rel=0.02)
    assert measured == count(shape).flops_per_token
    # Against the dense model of the same active width, only the router and the extra
    # experts' work differ: 3 passes x 2 FLOPs x (router + (k - 1) experts) per MoE layer.
    dense = count(_shape(d_ff=256)).flops_per_token
    per_layer = 6 * (64 * num_experts + (top_k - 1) * 2 * 64 * 256)
    assert measured - dense == shape.n_moe_layers * per_layer


def test_moe_flops_count_dropped_tokens_as_not_computed() -> None:
    # With a tight capacity factor some assignments are dropped: the measured FLOPs fall
    # below count.py's k-experts-per-token figure, which is the planned (no-drop) compute.
    shape = _shape(family="moe", num_experts=4, top_k=2, n_layers=1)
    spec = ModelSpec(family="moe", num_experts=4, top_k=2, capacity_factor=0.5)
    measured = _measured_flops_per_token(GPT(shape, spec))
    assert measured < count(shape).flops_per_token


# --- the three conventions, stored and planned ------------------------------------------


def test_every_run_stores_all_three_conventions(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(Path("scaling").glob("*.py"))))
    shape = _shape(seq_len=16, n_layers=1, d_model=32, n_heads=1, d_ff=128)
    run = RunSpec(
        sweep="flops",
        data=DataSpec(corpus=str(corpus), seq_len=16, val_tokens=10 * 17),
        model=ModelSpec(),
        train=TrainSpec(batch_tokens=64, eval_points=1, threads=1),
        shape=shape.to_dict(),
        steps=2,
        tokens=128,
        target_params=1e4,
        flops="kaplan",
    )
    train_run(run, tmp_path / "sweep")
    (row,) = load_runs(tmp_path / "sweep").to_dict("records")
    counts = count(shape)
    assert row["flops_per_token"] == counts.flops_per_token
    assert row["flops_6n"] == counts.flops_6n == 6 * counts.params_active
    assert row["flops_kaplan"] == counts.flops_kaplan
    assert row["flops_convention"] == "kaplan"
    assert row["compute_shape"] == 128 * counts.flops_per_token
    assert row["compute_6n"] == 128 * counts.flops_6n
    assert row["compute_kaplan"] == 128 * counts.flops_kaplan
    assert row["compute"] == row["compute_kaplan"]  # the sweep's convention


@pytest.mark.parametrize("convention", ["6n", "shape", "kaplan"])
def test_flops_convention_plans_the_budgets(convention: str) -> None:
    raw = {
        "name": "p",
        "data": {"seq_len": 64},
        "model": {"head_dim": 16, "aspect_ratio": 32},
        "train": {"batch_tokens": 1024},
        "plan": {"kind": "isoflop", "compute": [1e12], "params": [5e4, 2e5]},
        "flops": convention,
    }
    planned = plan_sweep(parse_sweep(raw))
    assert len(planned) == 2
    for p in planned:
        per_token = p.counts.flops(convention)
        assert p.run.tokens == round(1e12 / per_token / 1024) * 1024
        assert p.summary()["compute"] == pytest.approx(1e12, rel=1024 / p.run.tokens)
    # Kaplan's count leaves out embeddings and the output layer, so it plans more tokens
    # for the same budget than 6N does at these sizes.
    if convention == "kaplan":
        k = p.counts
        assert k.flops_kaplan < k.flops_6n

"""Tests of the Mixture-of-Experts MLP: routing, losses, capacity, dispatch and sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scaling.data import load_corpus
from scaling.model.count import ModelShape, count
from scaling.model.gpt import GPT, MOE_STATS
from scaling.model.moe import (
    MoEMLP,
    dispatch_order,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)
from scaling.spec import DataSpec, ModelSpec, RunSpec, TrainSpec
from scaling.train import _Loop


def make_shape(
    d_model: int = 16,
    d_ff: int = 32,
    num_experts: int = 4,
    top_k: int = 2,
    shared_expert: bool = False,
    expert_granularity: int = 1,
    n_layers: int = 2,
) -> ModelShape:
    return ModelShape(
        vocab_size=256,
        seq_len=16,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=2,
        d_ff=d_ff,
        family="moe",
        num_experts=num_experts,
        top_k=top_k,
        expert_granularity=expert_granularity,
        shared_expert=shared_expert,
    )


def make_spec(**fields: object) -> ModelSpec:
    # model_copy skips validation, so that tests can set a capacity factor of 0.
    return ModelSpec(family="moe").model_copy(update=fields)


def reference_output(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The MoE output computed token by token, every chosen expert, no capacity."""
    x_flat = x.reshape(-1, moe.d_model)
    _, _, expert_index, gates = moe.route(x_flat)
    rows = []
    for t in range(x_flat.shape[0]):
        row = torch.zeros(moe.d_model)
        for e, g in zip(expert_index[t].tolist(), gates[t], strict=True):
            row = row + g * (F.gelu(x_flat[t] @ moe.w_up[e]) @ moe.w_down[e])
        if moe.shared_up is not None:
            row = row + moe.shared_down(F.gelu(moe.shared_up(x_flat[t])))
        rows.append(row)
    return torch.stack(rows).reshape(x.shape)


def force_routing(moe: MoEMLP, scale: float = 50.0) -> None:
    """Router logits = scale * x[:, :E], so one-hot inputs pick their expert."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, : moe.num_experts] = scale * torch.eye(moe.num_experts)


def one_hot_tokens(experts: list[int], d_model: int) -> torch.Tensor:
    """Tokens ``[1, T, d_model]`` whose largest router logit (under force_routing) is given."""
    return F.one_hot(torch.tensor(experts), d_model).float().unsqueeze(0)


# Load-balancing loss and z-loss


def test_balancing_loss_all_tokens_to_one_of_eight_experts_is_eight() -> None:
    probs = F.one_hot(torch.zeros(64, dtype=torch.long), 8).float()
    index = torch.zeros(64, 1, dtype=torch.long)
    assert load_balancing_loss(probs, index, 8).item() == pytest.approx(8.0)


def test_balancing_loss_uniform_routing_is_one() -> None:
    probs = torch.full((64, 8), 1 / 8)
    index = (torch.arange(64) % 8).unsqueeze(-1)
    assert load_balancing_loss(probs, index, 8).item() == pytest.approx(1.0)


def test_balancing_loss_uniform_top2_over_four_experts_is_one() -> None:
    probs = torch.full((64, 4), 1 / 4)
    pairs = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])
    index = pairs.repeat(16, 1)  # every expert gets a quarter of the 128 assignments
    assert load_balancing_loss(probs, index, 4).item() == pytest.approx(1.0)


def test_balancing_loss_through_the_module() -> None:
    # Switch over 8 experts, every token sent to expert 0 with probability ~1: 8.
    moe = MoEMLP(make_shape(num_experts=8, top_k=1), make_spec(router="switch", top_k=1))
    force_routing(moe)
    _, stats = moe(one_hot_tokens([0] * 32, 16))
    assert stats["aux_loss"].item() == pytest.approx(8.0, rel=1e-6)

    # A zero router gives uniform probabilities: 1 (top-2 over 4 experts).
    moe = MoEMLP(make_shape(num_experts=4, top_k=2), make_spec())
    torch.nn.init.zeros_(moe.router.weight)
    _, stats = moe(torch.randn(2, 8, 16))
    assert stats["aux_loss"].item() == pytest.approx(1.0)
    assert stats["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_router_z_loss() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**3) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


# Routing


def test_output_matches_token_by_token_reference_renormalised_or_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for normalize in (True, False):
        moe = MoEMLP(make_shape(), make_spec(normalize_topk=normalize))
        torch.nn.init.normal_(moe.router.weight, std=0.5)
        y, stats = moe(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, reference_output(moe, x), rtol=1e-5, atol=1e-6)
        assert stats["dropped_fraction"].item() == 0.0

        _, _, _, gates = moe.route(x.reshape(-1, 16))
        sums = gates.sum(-1)
        if normalize:
            torch.testing.assert_close(sums, torch.ones_like(sums))
        else:
            assert bool((sums < 1).all())


def test_switch_gate_is_the_softmax_probability_and_trains_the_router() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    switch = MoEMLP(make_shape(top_k=1), make_spec(router="switch", top_k=1))
    probs, _, index, gates = switch.route(x.reshape(-1, 16))
    torch.testing.assert_close(gates, probs.gather(-1, index))

    y, _ = switch(x)
    y.square().sum().backward()  # the task loss alone, no auxiliary losses
    assert switch.router.weight.grad is not None
    switch_grad = switch.router.weight.grad.abs().sum().item()
    assert switch_grad > 0

    # Top-1 renormalised has a gate of p / p = 1: the task loss cannot reach the router
    # (beyond rounding).
    top1 = MoEMLP(make_shape(top_k=1), make_spec(top_k=1, normalize_topk=True))
    top1.load_state_dict(switch.state_dict())
    y, _ = top1(x)
    y.square().sum().backward()
    grad = top1.router.weight.grad
    assert grad is None or grad.abs().sum().item() < 1e-6 * switch_grad


def test_switch_with_top_k_above_one_is_an_error() -> None:
    with pytest.raises(ValueError, match="top_k=2"):
        MoEMLP(make_shape(top_k=2), make_spec(router="switch"))


def test_shared_expert_adds_a_dense_mlp_for_every_token() -> None:
    torch.manual_seed(0)
    moe = MoEMLP(make_shape(shared_expert=True), make_spec())
    x = torch.randn(1, 6, 16)
    y, _ = moe(x)
    torch.testing.assert_close(y, reference_output(moe, x), rtol=1e-5, atol=1e-6)

    # With the routed experts switched off, only the shared expert remains.
    moe.capacity_factor = 0.0
    y, _ = moe(x)
    shared = moe.shared_down(F.gelu(moe.shared_up(x)))
    torch.testing.assert_close(y, shared)


def test_granularity_makes_smaller_experts() -> None:
    shape = make_shape(d_ff=64, num_experts=16, top_k=4, expert_granularity=4)
    moe = MoEMLP(shape, make_spec(top_k=4))
    assert tuple(moe.w_up.shape) == (16, 16, 16)
    assert tuple(moe.w_down.shape) == (16, 16, 16)
    x = torch.randn(1, 5, 16)
    y, _ = moe(x)
    torch.testing.assert_close(y, reference_output(moe, x), rtol=1e-5, atol=1e-6)


# Capacity and dropping


def test_capacity() -> None:
    assert expert_capacity(None, 4096, 2, 8) is None
    assert expert_capacity(1.0, 4096, 2, 8) == 1024
    assert expert_capacity(1.25, 10, 1, 4) == 4  # ceil(3.125)
    assert expert_capacity(0.0, 4096, 2, 8) == 0


def test_capacity_zero_gives_zero_output() -> None:
    moe = MoEMLP(make_shape(), make_spec(capacity_factor=0.0))
    x = torch.randn(2, 4, 16, requires_grad=True)
    y, stats = moe(x)
    assert torch.equal(y, torch.zeros_like(y))
    assert stats["dropped_fraction"].item() == 1.0


def test_dropped_fraction_on_a_hand_made_case() -> None:
    # Eight tokens, top-1 over four experts: six want expert 0, two want expert 1.
    # capacity = ceil(1.0 * 8 * 1 / 4) = 2, so expert 0 keeps tokens 0 and 1 and drops four.
    moe = MoEMLP(make_shape(top_k=1), make_spec(top_k=1, capacity_factor=1.0))
    force_routing(moe)
    x = one_hot_tokens([0, 0, 0, 0, 0, 0, 1, 1], 16)
    y, stats = moe(x)
    assert stats["dropped_fraction"].item() == pytest.approx(4 / 8)

    kept = y[0].abs().sum(-1) > 0
    assert kept.tolist() == [True, True, False, False, False, False, True, True]
    reference = reference_output(moe, x)
    torch.testing.assert_close(y[0, kept], reference[0, kept])


def test_dispatch_keeps_first_choices_before_second_choices() -> None:
    # Three tokens, top-2 over two experts, capacity 2.
    index = torch.tensor([[0, 1], [0, 1], [1, 0]])
    order, kept = dispatch_order(index, 2, capacity=2)
    # Assignment a = choice * 3 + token. Expert 0 keeps the first choices of tokens 0 and 1
    # and drops token 2's second choice; expert 1 keeps token 2's first choice and token
    # 0's second choice, and drops token 1's second choice.
    assert order.tolist() == [0, 1, 2, 3]
    assert kept.tolist() == [2, 2]

    order, kept = dispatch_order(index, 2, capacity=None)
    assert sorted(order.tolist()) == list(range(6))
    assert kept.tolist() == [3, 3]


# Compute and sizes


def test_only_chosen_experts_compute() -> None:
    d, h, n_exp, k, n_tok = 16, 32, 4, 2, 12
    moe = MoEMLP(make_shape(d_model=d, d_ff=h, num_experts=n_exp, top_k=k), make_spec())
    force_routing(moe)
    # Every token prefers expert 0, then expert 1; experts 2 and 3 are never chosen.
    x = torch.zeros(1, n_tok, d)
    x[..., 0], x[..., 1] = 1.0, 0.5

    with FlopCounterMode(display=False) as counter:
        y, _ = moe(x)
    router_flops = 2 * n_tok * d * n_exp
    expert_flops = 2 * (n_tok * k) * (d * h + h * d)
    assert counter.get_total_flops() == router_flops + expert_flops

    y.square().sum().backward()
    assert moe.w_up.grad is not None and moe.w_down.grad is not None
    assert moe.w_up.grad[:2].abs().sum() > 0
    assert torch.equal(moe.w_up.grad[2:], torch.zeros_like(moe.w_up.grad[2:]))
    assert torch.equal(moe.w_down.grad[2:], torch.zeros_like(moe.w_down.grad[2:]))


@pytest.mark.parametrize(
    ("granularity", "num_experts", "top_k", "shared"),
    [(1, 8, 2, False), (1, 4, 1, True), (4, 32, 8, False), (2, 16, 2, True)],
)
def test_parameter_count_matches_count(
    granularity: int, num_experts: int, top_k: int, shared: bool
) -> None:
    shape = make_shape(
        d_model=32,
        d_ff=128,
        num_experts=num_experts,
        top_k=top_k,
        shared_expert=shared,
        expert_granularity=granularity,
        n_layers=1,
    )
    moe = MoEMLP(shape, make_spec(top_k=top_k))

    # One block: the MoE layer's count is the model's count minus the dense model's,
    # plus the dense MLP that the MoE layer replaces.
    dense = count(ModelShape(**{**shape.to_dict(), "family": "gpt"}))
    dense_mlp = 2 * shape.d_model * shape.d_ff
    layer = count(shape).params - dense.params + dense_mlp
    layer_active = count(shape).params_active - dense.params + dense_mlp
    assert sum(p.numel() for p in moe.parameters()) == layer

    expert = moe.w_up[0].numel() + moe.w_down[0].numel()
    active = moe.router.weight.numel() + (top_k + int(shared)) * expert
    assert active == layer_active


def test_initialisation_scales() -> None:
    torch.manual_seed(0)
    moe = MoEMLP(make_shape(d_model=64, d_ff=256, n_layers=8), make_spec())
    assert moe.w_up.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.w_down.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert moe.router.weight.std().item() < 0.01


def test_bf16_autocast_runs_and_keeps_dtype() -> None:
    moe = MoEMLP(make_shape(shared_expert=True), make_spec(capacity_factor=1.0))
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = moe(x)
    assert y.dtype == x.dtype
    assert stats["aux_loss"].dtype == torch.float32


# Balance is judged per layer


def _opposite_layers_gpt(n_experts: int = 8) -> GPT:
    """A two-block MoE GPT (Switch, top-1) where every token reaches each router as the
    same vector, block 0's router sends it to expert 0 and block 1's to expert 1."""
    shape = ModelShape(
        vocab_size=256, seq_len=16, n_layers=2, d_model=16, n_heads=2, d_ff=32, family="moe",
        num_experts=n_experts, top_k=1,
    )  # fmt: skip
    model = GPT(shape, make_spec(router="switch", top_k=1, num_experts=n_experts))
    with torch.no_grad():
        # Every token embeds to the same vector; attention and experts add nothing to the
        # residual stream, so both routers see LayerNorm(v) for every token.
        v = torch.linspace(-1.0, 1.0, 16)
        model.tok_emb.weight.copy_(v.expand(256, 16))
        model.pos_emb.weight.zero_()
        u = F.layer_norm(v, (16,))
        for expert, block in enumerate(model.blocks):
            block.attn.proj.weight.zero_()
            block.mlp.w_down.zero_()
            block.mlp.router.weight.zero_()
            block.mlp.router.weight[expert] = 5.0 * u
    return model


def test_per_layer_balance_is_not_hidden_by_pooling_layers() -> None:
    model = _opposite_layers_gpt()
    idx = torch.randint(0, 256, (2, 16))
    _, _, stats = model(idx, idx)

    # What each router sees (the same for both blocks, see _opposite_layers_gpt).
    x = model.blocks[0].ln2(model.tok_emb(idx).reshape(-1, 16))  # [32, 16]
    routed = [block.mlp.route(x) for block in model.blocks]
    probs = [r[0] for r in routed]
    chosen = [r[2] for r in routed]
    assert [c.unique().tolist() for c in chosen] == [[0], [1]]

    # Each layer sends every token to one expert: each layer's loss is num_experts = 8,
    # and so is their average, which is what the GPT reports and trains on.
    per_layer = [load_balancing_loss(p, c, 8).item() for p, c in zip(probs, chosen, strict=True)]
    assert per_layer == pytest.approx([8.0, 8.0], rel=1e-4)
    assert stats["aux_loss"].item() == pytest.approx(8.0, rel=1e-4)

    # Pooling both layers' assignments and probabilities before the product would look
    # twice as balanced: f = P = (1/2, 1/2, 0, ...), so 8 * (1/4 + 1/4) = 4.
    pooled = load_balancing_loss(torch.cat(probs), torch.cat(chosen), 8)
    assert pooled.item() == pytest.approx(4.0, rel=1e-4)


def test_trainer_reports_the_per_layer_average(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(256)) * 40)
    model = _opposite_layers_gpt()
    run = RunSpec(
        sweep="t",
        data=DataSpec(corpus=str(corpus), seq_len=16, val_tokens=4 * 17),
        model=model.spec,
        train=TrainSpec(batch_tokens=64, micro_batch_tokens=32, threads=1),
        shape=model.shape.to_dict(),
        steps=1,
        tokens=64,
        target_params=1e4,
    )
    loop = _Loop(run, load_corpus(run.data), tmp_path / "ckpt.pt")
    loop.model.load_state_dict(model.state_dict())
    _, moe, _ = loop.train_step(lr=0.0)  # two micro-batches, averaged
    stats = dict(zip(MOE_STATS, moe.tolist(), strict=True))
    assert stats["aux_loss"] == pytest.approx(8.0, rel=1e-4)
    assert stats["dropped_fraction"] == 0.0

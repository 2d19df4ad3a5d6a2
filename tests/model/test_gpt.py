"""The GPT module matches the layout that ``scaling.model.count`` counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaling.model.count import ModelShape, count
from scaling.model.gpt import GPT, INIT_STD, causal_attention_math


def _shape(**kwargs: object) -> ModelShape:
    base = dict(vocab_size=256, seq_len=32, n_layers=2, d_model=64, n_heads=2, d_ff=256)
    base.update(kwargs)
    return ModelShape(**base)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("d_model,n_layers", [(32, 1), (64, 3), (96, 2)])
def test_parameter_count_matches(tie: bool, d_model: int, n_layers: int) -> None:
    shape = _shape(d_model=d_model, n_layers=n_layers, d_ff=4 * d_model, tie_embeddings=tie)
    model = GPT(shape)
    assert sum(p.numel() for p in model.parameters()) == count(shape).params


def test_tied_head_is_the_embedding() -> None:
    model = GPT(_shape(tie_embeddings=True))
    assert model.head is None
    untied = GPT(_shape(tie_embeddings=False))
    assert untied.head is not None and untied.head.weight is not untied.tok_emb.weight


def test_flops_match_flop_counter() -> None:
    shape = _shape(seq_len=64)
    model = GPT(shape)
    idx = torch.randint(0, 256, (4, 64))
    counter = FlopCounterMode(display=False)
    # On CPU the fused attention kernel is not known to FlopCounterMode (it counts zero
    # FLOPs for it); the math backend runs the same attention as two batched matmuls over
    # the full T x T score matrix, which it does count, as count.py does (Chinchilla,
    # appendix F). Embedding look-ups, norms, softmax and the loss are not matmuls and
    # neither side counts them, so the two agree exactly here; 2% is the contract.
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss, _ = model(idx, idx)
        loss.backward()
    measured = counter.get_total_flops()
    expected = count(shape).flops_per_token * idx.numel()
    assert measured == pytest.approx(expected, rel=0.02)


def test_forward_shapes_and_loss() -> None:
    torch.manual_seed(0)
    model = GPT(_shape())
    idx = torch.randint(0, 256, (3, 32))
    targets = torch.randint(0, 256, (3, 32))
    logits, loss, stats = model(idx, targets)
    assert logits.shape == (3, 32, 256)
    # At initialisation the prediction is close to uniform over the 256 bytes.
    assert abs(loss.item() - math.log(256)) < 0.1
    assert torch.equal(stats["ce_loss"], loss.detach())
    logits, loss, _ = model(idx[:, :10])
    assert logits.shape == (3, 10, 256) and loss is None


def test_causal() -> None:
    torch.manual_seed(0)
    model = GPT(_shape())
    idx = torch.randint(0, 256, (1, 32))
    changed = idx.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 256
    a, _, _ = model(idx)
    b, _, _ = model(changed)
    assert torch.equal(a[0, :20], b[0, :20])
    assert not torch.equal(a[0, 20:], b[0, 20:])


def test_gpt2_init() -> None:
    torch.manual_seed(0)
    shape = _shape(d_model=128, n_layers=8, n_heads=4, d_ff=512)
    model = GPT(shape)
    residual = INIT_STD / math.sqrt(2 * shape.n_layers)
    assert model.tok_emb.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[3].mlp.down.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(model.ln_f.weight, torch.ones(128))


def test_math_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention_math(q, k, v), expected, atol=1e-5)
    # In bf16 (where the model uses it on CPU) it stays within bf16 rounding.
    low = causal_attention_math(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), expected, atol=3e-2)


def test_bf16_autocast_loss_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = GPT(_shape())
    idx = torch.randint(0, 256, (4, 32))
    _, loss32, _ = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16, _ = model(idx, idx)
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)

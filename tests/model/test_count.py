"""Parameter and FLOP counts of ``scaling.model.count`` against counts written out by hand."""

from __future__ import annotations

from scaling.model.count import ModelShape, count

# A small dense model: every term below is written out from the layout in count.py.
V, T, d, L, d_ff = 256, 16, 32, 2, 128


def _shape(tie: bool = True) -> ModelShape:
    return ModelShape(
        vocab_size=V, seq_len=T, n_layers=L, d_model=d, n_heads=2, d_ff=d_ff, tie_embeddings=tie
    )


def test_params_by_hand() -> None:
    token_embedding = 256 * 32  # 8192
    position_embedding = 16 * 32  # 512
    per_block = (
        32  # first LayerNorm, weight only
        + 32 * 96  # fused QKV, 3072
        + 32 * 32  # attention output projection, 1024
        + 32  # second LayerNorm
        + 32 * 128  # MLP up, 4096
        + 128 * 32  # MLP down, 4096
    )  # 12352
    final_norm = 32
    blocks = 2 * per_block  # 24704

    tied = count(_shape(tie=True))
    assert tied.params == token_embedding + position_embedding + blocks + final_norm == 33440
    assert tied.params_nonembedding == blocks + final_norm == 24736
    assert tied.params_active == tied.params
    assert isinstance(tied.params, int)
    assert tied.params_embedding == token_embedding + position_embedding

    untied = count(_shape(tie=False))
    output_layer = 32 * 256
    assert untied.params == tied.params + output_layer == 41632
    assert untied.params_nonembedding == tied.params_nonembedding
    assert untied.params_embedding == tied.params_embedding + output_layer


def test_flops_by_hand() -> None:
    # Forward, per token: 2 FLOPs per multiply-add of every matmul ...
    qkv, proj = 32 * 96, 32 * 32
    mlp = 32 * 128 + 128 * 32
    output_layer = 32 * 256
    matmul = 2 * (2 * (qkv + proj + mlp) + output_layer)  # 2 * (24576 + 8192) = 65536
    # ... and attention over the full T x T matrix: scores q.k (2 T d) and the weighted sum
    # of values (2 T d) in each of the 2 layers.
    attention = 2 * (2 * 16 * 32 + 2 * 16 * 32)  # 4096
    forward = matmul + attention  # 69632

    counts = count(_shape())
    assert counts.flops_forward == forward == 69632
    assert counts.flops_per_token == 3 * forward == 208896  # backward is twice the forward
    assert counts.flops_6n == 6 * 33440
    assert counts.flops_kaplan == 6 * 24736 + 6 * 2 * 16 * 32
    assert counts.attention_flops_causal == 3 * 2 * 2 * (16 + 1) * 32
    assert counts.flops("6n") == counts.flops_6n
    assert counts.flops("shape") == counts.flops_per_token
    assert counts.flops("kaplan") == counts.flops_kaplan


def test_moe_params_by_hand() -> None:
    # 4 experts, top-2, every second block MoE (block 1 of 0..1), experts of d_ff / 2 units.
    shape = ModelShape(
        vocab_size=V, seq_len=T, n_layers=L, d_model=d, n_heads=2, d_ff=d_ff, family="moe",
        num_experts=4, top_k=2, moe_every=2, expert_granularity=2,
    )  # fmt: skip
    assert [shape.is_moe_layer(i) for i in range(L)] == [False, True]
    expert = 2 * 32 * 64  # up and down of 64 hidden units
    router = 32 * 4
    attention_and_norms = 32 + 32 * 96 + 32 * 32 + 32
    dense_block = attention_and_norms + 2 * 32 * 128
    moe_block = attention_and_norms + router + 4 * expert
    embeddings = 256 * 32 + 16 * 32

    counts = count(shape)
    assert counts.params == embeddings + dense_block + moe_block + 32
    assert counts.params_active == counts.params - 2 * expert  # 2 of the 4 experts idle

"""Training FLOPs per token against a hand count for a tiny model of every family (docs/models.md).

Convention: 6N + 3 x (forward FLOPs of sequence mixing), N the parameters a token passes through:
all of them but lookup-only embedding tables and the experts it is not routed to.
"""

from __future__ import annotations

import pytest

from lmlab.models import (
    GPT,
    Jamba,
    Llama,
    LSTMAttentionLM,
    Mamba,
    MoEConfig,
    RecurrentLM,
    TransformerLM,
    count_parameters,
)

V, D, T = 11, 16, 16  # vocabulary, width, sequence length


def test_gpt() -> None:
    block = D + 3 * D * D + D * D + D + 4 * D * D + 4 * D * D  # ln1, qkv, proj, ln2, fc, proj (no biases)
    n = V * D + 2 * block + D  # tied output layer, 2 blocks, final norm; the position table is a lookup
    model = GPT(V, d_model=D, n_layer=2, n_head=2, block_size=T)
    assert count_parameters(model) == n + T * D
    assert model.flops_per_token() == 6 * n + 12 * 2 * D * T  # 12 L H Q T with H Q = d_model
    assert model.flops_per_token(8) == 6 * n + 12 * 2 * D * 8


def test_gpt_moe_counts_only_the_routed_experts() -> None:
    mlp = 4 * D * D + 4 * D * D
    attn_and_norms = 2 * D + 4 * D * D
    router = D * 4
    model = GPT(V, d_model=D, n_layer=2, n_head=2, block_size=T, moe=MoEConfig(n_experts=4, top_k=2, moe_every=2))
    assert count_parameters(model) == V * D + T * D + 2 * attn_and_norms + mlp + router + 4 * mlp + D
    active = V * D + 2 * attn_and_norms + mlp + router + 2 * mlp + D
    assert model.flops_per_token(T) == 6 * active + 12 * 2 * D * T


def test_transformer() -> None:
    d_ff = 32
    block = (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (D * d_ff + d_ff) + (d_ff * D + D) + 2 * D
    n = V * D + 2 * block  # tied, no final norm; sinusoidal positions are a buffer
    model = TransformerLM(V, d_model=D, n_layer=2, n_head=2, d_ff=d_ff, block_size=T)
    assert model.flops_per_token(T) == 6 * n + 12 * 2 * D * T


@pytest.mark.parametrize(("cell", "gates"), [("rnn", 1), ("gru", 3), ("lstm", 4)])
@pytest.mark.parametrize("tie", [True, False])
def test_recurrent(cell: str, gates: int, tie: bool) -> None:
    """Cells and output layer only; an untied input embedding is a lookup, so tying changes nothing."""
    layer = gates * D * D * 2 + gates * D * 2  # input and hidden matrices, two bias vectors
    n = 2 * layer + V * D + V
    model = RecurrentLM(V, cell=cell, d_model=D, n_layer=2, tie_weights=tie)
    assert model.flops_per_token() == model.flops_per_token(1000) == 6 * n


def test_llama_gqa_untied() -> None:
    d_ff, n_head, n_kv, head_dim = 24, 4, 2, 4
    attn = D * n_head * head_dim + D * 2 * n_kv * head_dim + n_head * head_dim * D
    block = D + attn + D + 3 * D * d_ff  # two RMSNorms, SwiGLU's three matrices, no biases
    n = 2 * block + D + V * D  # final norm, untied output layer; the input embedding is a lookup
    model = Llama(V, d_model=D, n_layer=2, n_head=n_head, n_kv_head=n_kv, d_ff=d_ff, block_size=T, tie_weights=False)
    assert count_parameters(model) == n + V * D
    assert model.flops_per_token(T) == 6 * n + 12 * 2 * n_head * head_dim * T


def test_lstm_attention() -> None:
    lstm = 4 * D * D * 2 + 4 * D * 2
    n = lstm + 3 * D * D + (2 * D * D + D) + V * D + V  # LSTM, q/k/v, combine, tied output + bias
    model = LSTMAttentionLM(V, d_model=D, n_layer=1, n_head=2, window=5)
    keys = 5 + 1  # the window and the position itself
    assert model.flops_per_token(T) == model.flops_per_token() == 6 * n + 12 * D * keys
    assert model.flops_per_token(3) == 6 * n + 12 * D * 3


def mamba_mixer(d_state: int = 4, d_conv: int = 3, expand: int = 2) -> int:
    d_inner, dt_rank = expand * D, 1  # dt_rank = ceil(16 / 16)
    return (
        D * 2 * d_inner  # in_proj
        + d_inner * d_conv
        + d_inner  # depthwise conv and bias
        + d_inner * (dt_rank + 2 * d_state)  # x_proj
        + dt_rank * d_inner
        + d_inner  # dt_proj
        + d_inner * d_state
        + d_inner  # A_log, D
        + d_inner * D  # out_proj
    )


def test_mamba() -> None:
    n = 2 * (D + mamba_mixer()) + D + V * D  # norm + mixer per block, final norm, tied output
    model = Mamba(V, d_model=D, n_layer=2, d_state=4, d_conv=3, expand=2)
    assert model.flops_per_token() == model.flops_per_token(T) == 6 * n + 3 * 2 * 9 * (2 * D) * 4


def test_jamba_with_experts() -> None:
    d_ff, swiglu = 24, 3 * D * 24
    attn = D * D + D * 2 * 1 * 8 + D * D  # q, one key/value head of 8, proj
    router = D * 3
    # layer 0: Mamba + SwiGLU; layer 1: attention + MoE (3 experts, 1 routed); 2 norms each
    total = (2 * D + mamba_mixer() + swiglu) + (2 * D + attn + router + 3 * swiglu) + D + V * D
    active = total - 2 * swiglu
    model = Jamba(
        V,
        d_model=D,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        attn_every=2,
        attn_offset=1,
        d_state=4,
        d_conv=3,
        d_ff=d_ff,
        moe=MoEConfig(n_experts=3, top_k=1, moe_every=2),
        block_size=T,
    )
    assert count_parameters(model) == total
    assert model.flops_per_token(T) == 6 * active + 3 * (9 * 2 * D * 4 + 4 * D * T)

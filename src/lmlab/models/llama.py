"""A Llama-style GPT (Touvron et al. 2023): RMSNorm pre-norm, rotary positions, SwiGLU, no biases,
grouped-query attention.

Made to run at GPT's speed: the rotary tables are computed once per forward and shared by every
layer, queries and keys are rotated in their own dtype with five elementwise ops, and grouped
keys/values go to scaled_dot_product_attention as they are (enable_gqa), never repeated per head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.models.attention import AttentionLM, GroupedQueryAttention, attend, check_kv_heads, positions
from lmlab.models.base import check_sizes, padded_vocab_size
from lmlab.models.ffn import SwiGLU, swiglu_hidden
from lmlab.models.moe_config import MoEConfig
from lmlab.models.rope import rope_tables, rotate
from lmlab.models.state import KVCache


class LlamaAttention(GroupedQueryAttention):
    """GroupedQueryAttention (the same weights, `q`, `kv`, `proj`) rotating its queries and keys by
    tables the model computed once for this forward, instead of building them in every layer."""

    def forward(self, x: Tensor, cache: KVCache | None, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, T, _ = x.shape
        q = rotate(self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2), *rope)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_head, self.head_dim).transpose(1, 3).unbind(2)
        y = attend(q, rotate(k, *rope), v, cache, layer, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


class LlamaBlock(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x)), with RMSNorm: no mean subtraction, no bias."""

    def __init__(self, d_model: int, attn: nn.Module, mlp: nn.Module, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = mlp

    def forward(self, x: Tensor, cache: KVCache | None, layer: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        """`rope`: the (cos, sin) tables of the new tokens' positions, shared by every layer."""
        x = x + self.attn(self.norm1(x), cache, layer, rope)
        return x + self.mlp(self.norm2(x))


class Llama(AttentionLM):
    """Token embedding, no position table (RoPE rotates queries and keys), pre-norm blocks, final RMSNorm.

    The context is the `block_size` it is trained on. `rope_scaling=F` divides positions by F
    (position interpolation), so F x block_size tokens fit; without it longer inputs are refused,
    as RoPE does not extrapolate past trained positions. `d_ff=None` takes ~8/3 d_model rounded up
    to `multiple_of`. `n_kv_head` < n_head shares key/value heads (GQA); None means n_head.
    `moe` with n_experts > 0 makes every `moe_every`-th feed-forward a mixture of SwiGLU experts
    (moe.py). These defaults are model=llama's.
    """

    block_types = (LlamaBlock,)

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 3,
        n_head: int = 4,
        n_kv_head: int | None = 2,
        d_ff: int | None = None,
        multiple_of: int = 32,
        dropout: float = 0.0,
        block_size: int = 64,
        rope_base: float = 10000.0,
        rope_scaling: float | None = None,
        tie_weights: bool = True,
        norm_eps: float = 1e-5,
        pad_vocab_to: int = 1,
        moe: MoEConfig | Mapping[str, Any] = MoEConfig(),
    ) -> None:
        check_sizes(multiple_of=multiple_of)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        d_ff = swiglu_hidden(d_model, multiple_of) if d_ff is None else d_ff
        super().__init__(vocab_size, d_model, n_layer, n_head, dropout, block_size, pad_vocab_to, d_ff=d_ff)
        check_kv_heads(n_head, n_kv_head)
        moe = MoEConfig.of(moe)
        moe.check(n_layer)
        if rope_base <= 1:
            raise ValueError(f"rope_base must be > 1 (got {rope_base}): set model.rope_base to e.g. 10000")
        if rope_scaling is not None and rope_scaling < 1:
            raise ValueError(
                f"rope_scaling must be >= 1 (got {rope_scaling}): set model.rope_scaling to the factor by which "
                "to extend the trained context, or null"
            )
        self.n_kv_head, self.context_length = n_kv_head, math.floor(block_size * (rope_scaling or 1))
        self.rope_base, self.rope_scaling = rope_base, rope_scaling
        self.too_long = (
            f"the model was trained on {block_size} positions; set model.rope_scaling=F to read "
            f"F x {block_size} tokens (RoPE position interpolation), or crop the input to the last "
            f"{self.context_length} tokens"
        )

        def mlp(layer: int) -> nn.Module:
            return moe.feed_forward(layer, lambda: SwiGLU(d_model, d_ff, dropout), d_model)

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            LlamaBlock(
                d_model,
                LlamaAttention(d_model, n_head, n_kv_head, dropout, rope_base, rope_scaling),
                mlp(i),
                norm_eps,
            )
            for i in range(n_layer)
        )
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)
        self.init_gpt2()  # no biases to zero here
        if tie_weights:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        pos = positions(idx, state, self.context_length, self.too_long)  # checks the length too
        x = self.drop(self.wte(idx))
        rope = rope_tables(pos, self.d_model // self.n_head, self.rope_base, self.rope_scaling, matmul_dtype(x))
        for layer, block in enumerate(self.blocks):
            x = self.call_block(block, x, state, layer, rope)
        if state is not None:
            state.length += idx.size(1)
        return self._unpad(self.lm_head(self.norm(x))), state


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype linear layers give for input x: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

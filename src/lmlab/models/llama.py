"""A Llama-style GPT (Touvron et al. 2023): RMSNorm pre-norm, rotary positions, SwiGLU, no biases,
grouped-query attention."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lmlab.models.attention import AttentionLM, GroupedQueryAttention, check_kv_heads, positions
from lmlab.models.base import check_sizes, padded_vocab_size
from lmlab.models.ffn import SwiGLU, swiglu_hidden
from lmlab.models.moe_config import MoEConfig
from lmlab.models.state import KVCache


class LlamaBlock(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x)), with RMSNorm: no mean subtraction, no bias."""

    def __init__(self, d_model: int, attn: nn.Module, mlp: nn.Module, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = mlp

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class Llama(AttentionLM):
    """Token embedding, no position table (RoPE rotates queries and keys), pre-norm blocks, final RMSNorm.

    The context is the `block_size` it is trained on. `rope_scaling=F` divides positions by F
    (position interpolation), so F x block_size tokens fit; without it longer inputs are refused,
    as RoPE does not extrapolate past trained positions. `d_ff=None` takes ~8/3 d_model rounded up
    to `multiple_of`. `n_kv_head` < n_head shares key/value heads (GQA); None means n_head.
    `moe` with n_experts > 0 makes every `moe_every`-th feed-forward a mixture of SwiGLU experts
    (moe.py). The defaults are conf/model/llama.yaml's.
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
                GroupedQueryAttention(d_model, n_head, n_kv_head, dropout, rope_base, rope_scaling),
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
        positions(idx, state, self.context_length, self.too_long)  # RoPE places the tokens; this checks the length
        x = self.run_blocks(self.drop(self.wte(idx)), state)
        return self._unpad(self.lm_head(self.norm(x))), state

"""Causal self-attention over a KV cache: GPT/Transformer's multi-head form and Llama/Jamba's
grouped-query form, and what the attention language models share (AttentionLM)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.base import LanguageModel, check_dropout, check_heads, check_sizes
from lmlab.models.rope import apply_rope
from lmlab.models.state import KVCache


def positions(idx: Tensor, cache: KVCache | None, context_length: int, remedy: str | None = None) -> Tensor:
    """Positions of the new tokens (they start after the cached ones), checked against the
    context length, since position embeddings and the cache end there."""
    start = 0 if cache is None else cache.length
    end = start + idx.size(1)
    if end > context_length:
        cached = f" ({start} cached + {idx.size(1)} new)" if start else ""
        remedy = remedy or f"crop the input to the last {context_length} tokens or raise model.block_size"
        raise ValueError(f"sequence of {end} tokens{cached} exceeds the context length {context_length}: {remedy}")
    return torch.arange(end, device=idx.device) if cache is None else cache.new_positions(idx.size(1), idx.device)


def attend(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, layer: int, dropout: float) -> Tensor:
    """Causal attention of q [B, H, T, hd] over the cached keys plus k, v [B, H_kv, T, hd] (stored
    in the cache first). H_kv < H shares each key/value head among H / H_kv query heads (GQA).
    The cache says which keys each query sees (KVCache.mask)."""
    mask, is_causal = None, True
    if cache is not None:
        k, v = cache.update(layer, k, v)
        mask, is_causal = cache.mask(q.size(2), q.device)
    grouped = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    # flash / memory-efficient kernels where available
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, **grouped)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each token sees only itself and earlier tokens."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # one matmul for q, k and v
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, H, T, head_dim]: each head attends independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, cache, layer, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))


class GroupedQueryAttention(nn.Module):
    """Llama's attention: no biases, n_kv_head key/value heads shared by groups of the n_head query
    heads (Ainslie et al. 2023; a smaller KV cache), and rotary positions when `rope_base` is set
    (Jamba's attention layers have none: its Mamba layers tell positions apart)."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        dropout: float = 0.0,
        rope_base: float | None = None,
        rope_scaling: float | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.dropout, self.rope_base, self.rope_scaling = dropout, rope_base, rope_scaling
        self.q = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_kv_head * self.head_dim, bias=False)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_head, self.head_dim).transpose(1, 3).unbind(2)
        if self.rope_base is not None:
            # every layer sees the same positions: the cache advances after the last layer
            pos = torch.arange(T, device=x.device) if cache is None else cache.new_positions(T, x.device)
            q = apply_rope(q, pos, self.rope_base, self.rope_scaling)
            k = apply_rope(k, pos, self.rope_base, self.rope_scaling)
        y = attend(q, k, v, cache, layer, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


def check_attention(
    vocab_size: int, d_model: int, n_layer: int, n_head: int, dropout: float, **other_sizes: int
) -> None:
    """What every model with attention heads checks first: positive sizes (in this order), heads that
    split d_model exactly, a dropout in [0, 1)."""
    check_sizes(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head, **other_sizes)
    check_heads(d_model, n_head)
    check_dropout(dropout)


def check_kv_heads(n_head: int, n_kv_head: int) -> None:
    check_sizes(n_kv_head=n_kv_head)
    if n_head % n_kv_head != 0:
        raise ValueError(
            f"n_kv_head must divide n_head (got n_head={n_head}, n_kv_head={n_kv_head}): each key/value head "
            f"serves n_head / n_kv_head query heads; set model.n_kv_head to a divisor of model.n_head"
        )


class AttentionLM(LanguageModel):
    """What GPT, TransformerLM and Llama share: their size checks, their context and their KV cache.

    Subclasses build `wte` and `blocks` (each called as `block(x, cache, layer)`); `run_blocks`
    feeds them and advances the cache once all layers have stored the new tokens.
    """

    supports_static_cache = True

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        n_head: int,
        dropout: float,
        block_size: int,
        pad_vocab_to: int,
        **other_sizes: int,
    ) -> None:
        super().__init__()
        check_attention(
            vocab_size,
            d_model,
            n_layer,
            n_head,
            dropout,
            block_size=block_size,
            pad_vocab_to=pad_vocab_to,
            **other_sizes,
        )
        self.vocab_size, self.context_length = vocab_size, block_size
        self.d_model, self.n_layer, self.n_head = d_model, n_layer, n_head
        self.n_kv_head = n_head  # key/value heads the cache holds; fewer with grouped-query attention

    def init_gpt2(self) -> None:
        """GPT-2's init: linear and embedding weights N(0, 0.02), biases zero; the projections that
        write into the residual stream (`proj`) N(0, 0.02 / sqrt(2 * n_layer)), as 2 * n_layer of
        them add up along it."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, weight in self.blocks.named_parameters():
            if name.endswith("proj.weight"):  # attention and MLP (or expert) output projections
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layer))

    def run_blocks(self, x: Tensor, state: KVCache | None) -> Tensor:
        for layer, block in enumerate(self.blocks):
            x = self.call_block(block, x, state, layer)
        if state is not None:
            state.length += x.size(1)
        return x

    def init_state(self, batch_size: int, device: torch.device | str) -> KVCache:
        head_dim = self.d_model // self.n_head
        return KVCache(
            self.n_layer, batch_size, self.n_kv_head, head_dim, self.context_length, device, self.wte.weight.dtype
        )

    def mixing_flops(self, seq_len: int | None) -> int:
        """Attention scores and weighted sums, 2 x 2 x n_head x head_dim FLOPs per key per layer,
        with every query counted against seq_len keys (nanoGPT's 12LHQT, a causal upper bound)."""
        return 4 * self.n_layer * self.d_model * seq_len

"""Causal self-attention and its KV cache, shared by GPT and TransformerLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.base import LanguageModel, check_dropout, check_heads, check_sizes


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, preallocated (as in litgpt).

    Generation then computes keys and values for the new tokens only: each step costs O(T)
    instead of re-running the whole prefix at O(T^2). Fill it under torch.no_grad(): it is
    written in place. Attention layer `layer` reads and writes k[layer] and v[layer]; the model
    advances `length` once per forward, after all layers.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached so far

    @property
    def max_length(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' k, v [B, H, T, head_dim] at positions length..length+T-1 and
        return the keys and values of every token so far, [B, H, length+T, head_dim]."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def causal_mask(n_new: int, n_cached: int, device: torch.device) -> Tensor:
    """Boolean mask [n_new, n_cached + n_new]: new token i sees every cached token and the new
    tokens up to itself. SDPA's is_causal aligns its mask top-left, which is only right when
    there is no cache (queries and keys start at the same position); this one is aligned
    bottom-right."""
    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool, device=device).tril(diagonal=n_cached)


def positions(idx: Tensor, cache: KVCache | None, context_length: int) -> Tensor:
    """Positions of the new tokens (they start after the cached ones), checked against the
    context length, since position embeddings and the cache end there."""
    start = 0 if cache is None else cache.length
    end = start + idx.size(1)
    if end > context_length:
        cached = f" ({start} cached + {idx.size(1)} new)" if start else ""
        raise ValueError(
            f"sequence of {end} tokens{cached} exceeds the context length {context_length}: "
            f"crop the input to the last {context_length} tokens or raise model.block_size"
        )
    return torch.arange(start, end, device=idx.device)


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

        mask, is_causal = None, True
        if cache is not None:
            n_cached = cache.length
            k, v = cache.update(layer, k, v)
            if n_cached > 0:  # queries are the last T of the keys: is_causal would misalign
                is_causal = False
                mask = causal_mask(T, n_cached, x.device) if T > 1 else None  # one token sees all

        # flash / memory-efficient kernels where available
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))


class AttentionLM(LanguageModel):
    """What GPT and TransformerLM share: their size checks, their context and their KV cache.

    Subclasses build `wte` and `blocks` (each called as `block(x, cache, layer)`); `run_blocks`
    feeds them and advances the cache once all layers have stored the new tokens.
    """

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
        check_sizes(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layer=n_layer,
            n_head=n_head,
            block_size=block_size,
            pad_vocab_to=pad_vocab_to,
            **other_sizes,
        )
        check_heads(d_model, n_head)
        check_dropout(dropout)
        self.vocab_size, self.context_length = vocab_size, block_size
        self.d_model, self.n_layer, self.n_head = d_model, n_layer, n_head

    def run_blocks(self, x: Tensor, state: KVCache | None) -> Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, state, layer)
        if state is not None:
            state.length += x.size(1)
        return x

    def init_state(self, batch_size: int, device: torch.device | str) -> KVCache:
        head_dim = self.d_model // self.n_head
        return KVCache(
            self.n_layer, batch_size, self.n_head, head_dim, self.context_length, device, self.wte.weight.dtype
        )

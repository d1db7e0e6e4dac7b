"""The original transformer (Vaswani et al., 2017) as a decoder-only language model.

What distinguishes it from GPT: fixed sinusoidal positions instead of learned ones, the token
embedding scaled by sqrt(d_model), ReLU instead of GELU, and POST-norm residual blocks
(normalise after adding the sub-layer), which train less stably when deep than GPT's pre-norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmlab.models.attention import AttentionLM, CausalSelfAttention, positions
from lmlab.models.base import padded_vocab_size
from lmlab.models.state import KVCache


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)) (section 3.5):
    wavelengths in a geometric progression, so a fixed offset is a linear map of the encoding."""
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(n_positions, d_model)
    pe[:, 0::2] = torch.sin(position * inv_freq)
    pe[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]  # odd d_model: one fewer cosine
    return pe


class FeedForward(nn.Module):
    """Position-wise two-layer ReLU network; dropout on its output, before the residual add."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(torch.relu(self.fc(x))))


class PostNormBlock(nn.Module):
    """x = norm1(x + drop(attn(x))); x = norm2(x + drop(ffn(x))). The sub-layers apply the dropout."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_head, dropout, bias=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = self.norm1(x + self.attn(x, cache, layer))
        return self.norm2(x + self.ffn(x))


class TransformerLM(AttentionLM):
    """Vaswani et al.'s decoder stack with causal self-attention; context_length = block_size.

    No final LayerNorm: in a post-norm stack the last block already ends with one. These defaults are
    model=transformer's.
    """

    block_types = (PostNormBlock,)

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 3,
        n_head: int = 4,
        d_ff: int = 512,
        dropout: float = 0.1,
        block_size: int = 64,
        tie_weights: bool = True,
        pad_vocab_to: int = 1,
    ) -> None:
        super().__init__(vocab_size, d_model, n_layer, n_head, dropout, block_size, pad_vocab_to, d_ff=d_ff)

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        # fixed, so a buffer (moves with .to(), never trained); rebuilt on load, so not saved
        self.register_buffer("pos_enc", sinusoidal_positions(block_size, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PostNormBlock(d_model, n_head, d_ff, dropout) for _ in range(n_layer))
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)

        # fairseq's init: Xavier for linear maps; embeddings N(0, 1/d_model), so that after the
        # sqrt(d_model) scale tokens have unit variance, like the positions they are added to
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.wte.weight, std=d_model**-0.5)
        if tie_weights:  # Press & Wolf (2017), as in the paper (section 3.4)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        pos = positions(idx, state, self.context_length)
        x = self.run_blocks(self.drop(self.wte(idx) * math.sqrt(self.d_model) + self.pos_enc[pos]), state)
        return self._unpad(self.lm_head(x)), state

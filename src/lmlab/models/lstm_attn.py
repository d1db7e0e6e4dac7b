"""An LSTM language model that attends over its own recent outputs (Daniluk et al. 2017, "Frustratingly
short attention spans"; the "LSTM + attention" model of LM courses).

The LSTM carries a compressed summary of the past; the attention lets each position look back at
its last `window` hidden states directly, which an LSTM otherwise has to squeeze through its state.
The memory is bounded, so the model has no context limit and its state stays a fixed size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.attention import check_attention
from lmlab.models.base import LanguageModel, padded_vocab_size
from lmlab.models.state import MemoryState


def window_mask(n_new: int, n_memory: int, window: int, device: torch.device) -> Tensor:
    """[n_new, n_memory + n_new]: the new token at key position n_memory + i sees itself and the
    `window` keys before it, never a later one."""
    query = torch.arange(n_new, device=device)[:, None] + n_memory
    key = torch.arange(n_memory + n_new, device=device)[None, :]
    return (key <= query) & (key >= query - window)


class LSTMAttentionLM(LanguageModel):
    """Embedding -> dropout -> stacked LSTM -> causal attention over the last `window` top-layer
    outputs -> tanh(W [h; context]) -> dropout -> (tied) output layer.

    The state (MemoryState) is the LSTM's (h, c) plus the keys and values of the last `window`
    positions, so truncated BPTT and generation continue exactly where the last call stopped.
    Dropout is on the non-recurrent connections only, as in RecurrentLM. These defaults are
    model=lstm_attn's.
    """

    carries_state = True

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 2,
        n_head: int = 1,
        window: int = 32,
        dropout: float = 0.2,
        tie_weights: bool = True,
        pad_vocab_to: int = 1,
    ) -> None:
        super().__init__()
        check_attention(vocab_size, d_model, n_layer, n_head, dropout, window=window, pad_vocab_to=pad_vocab_to)
        self.vocab_size, self.context_length = vocab_size, None
        self.d_model, self.n_layer, self.n_head, self.window = d_model, n_layer, n_head, window

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.drop = nn.Dropout(dropout)
        between = dropout if n_layer > 1 else 0.0  # torch applies it between layers only
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layer, dropout=between, batch_first=True)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.combine = nn.Linear(2 * d_model, d_model)
        self.lm_head = nn.Linear(d_model, n_rows)
        nn.init.uniform_(self.wte.weight, -0.1, 0.1)
        nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)
        if tie_weights:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        B, T = idx.shape
        state = state if state is not None else self.init_state(B, idx.device)
        h, hidden = self.lstm(self.drop(self.wte(idx)), state.hidden)

        head_dim = self.d_model // self.n_head
        q, k, v = (t.view(B, T, self.n_head, head_dim).transpose(1, 2) for t in self.qkv(h).split(self.d_model, -1))
        keys = torch.cat([state.keys.to(k.dtype), k], dim=2)
        values = torch.cat([state.values.to(v.dtype), v], dim=2)
        mask = window_mask(T, state.keys.size(2), self.window, idx.device)
        context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).transpose(1, 2).reshape(B, T, -1)

        out = torch.tanh(self.combine(torch.cat([h, context], dim=-1)))
        memory = MemoryState(hidden, keys[:, :, -self.window :], values[:, :, -self.window :])
        return self._unpad(self.lm_head(self.drop(out))), memory

    def init_state(self, batch_size: int, device: torch.device | str) -> MemoryState:
        dtype = self.wte.weight.dtype
        h = torch.zeros(self.n_layer, batch_size, self.d_model, device=device, dtype=dtype)
        empty = torch.zeros(batch_size, self.n_head, 0, self.d_model // self.n_head, device=device, dtype=dtype)
        return MemoryState((h, torch.zeros_like(h)), empty, empty)

    def mixing_flops(self, seq_len: int | None) -> int:
        """Scores and weighted sum over the keys a query sees: window + 1 (itself), or fewer in a
        shorter sequence; 4 x d_model FLOPs per key."""
        keys = self.window + 1 if seq_len is None else min(self.window + 1, seq_len)
        return 4 * self.d_model * keys

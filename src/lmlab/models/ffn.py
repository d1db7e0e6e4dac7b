"""SwiGLU feed-forward (Shazeer 2020), the Llama and Jamba MLP."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden(d_model: int, multiple_of: int) -> int:
    """About 8/3 d_model, rounded up to a multiple: three matrices then hold as many weights as a
    4x GELU MLP's two (Llama's rule); the multiple keeps matmul shapes GPU-friendly."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases; dropout on its output."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.proj = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))

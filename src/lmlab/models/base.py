"""The one interface every language model implements, so the trainer and generation never branch.

A model maps token ids [B, T] and an optional state to logits [B, T, vocab_size] and a new state.
The state is whatever lets the next call continue where this one stopped: the hidden state of a
recurrent net (carried across batches for truncated BPTT) or the KV cache of an attention model
(carried across calls during generation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError

if TYPE_CHECKING:
    from lmlab.models.attention import KVCache

State = Union[Tensor, tuple[Tensor, ...], "KVCache"]


class ModelConfigError(ConfigError, ValueError):
    """A bad model size: a ValueError as PyTorch users expect, a ConfigError so entry points
    print it as one line."""


class LanguageModel(nn.Module, ABC):
    """Abstract base: next-token logits for every position, plus the state to continue from."""

    vocab_size: int
    context_length: int | None  # most tokens one sequence may hold; None means unbounded

    @abstractmethod
    def forward(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """idx: LongTensor [B, T] -> (logits [B, T, vocab_size], new_state)."""

    @abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str) -> State:
        """The state before any token: zero hidden state (recurrent) or an empty KVCache."""

    def _unpad(self, logits: Tensor) -> Tensor:
        """Drop the logits of padding rows, so padding never changes the probabilities."""
        return logits if logits.size(-1) == self.vocab_size else logits[..., : self.vocab_size]


def detach_state(state: State | None) -> State | None:
    """Cut the autograd history of a carried state, so truncated BPTT backpropagates through
    one batch only instead of through every batch since the start of the epoch."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple):
        return tuple(detach_state(s) for s in state)
    raise TypeError(f"detach_state expects None, a Tensor or a tuple of Tensors, got {type(state).__name__}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable numbers; nn.Module.parameters() yields a tied weight once."""
    return sum(p.numel() for p in model.parameters())


def padded_vocab_size(vocab_size: int, pad_vocab_to: int) -> int:
    """Round the embedding/output rows up to a multiple of pad_vocab_to (e.g. 64): GPU matmuls
    are much faster on such shapes, and the extra rows are sliced off the logits."""
    return math.ceil(vocab_size / pad_vocab_to) * pad_vocab_to


def check_sizes(**sizes: int) -> None:
    """Reject sizes < 1 with a message naming the config key, before torch fails obscurely."""
    for key, value in sizes.items():
        if value < 1:
            raise ModelConfigError(f"{key} must be >= 1 (got {value}): set model.{key} to a positive integer")


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"dropout must be in [0, 1) (got {dropout}): set model.dropout to e.g. 0.1")


def check_heads(d_model: int, n_head: int) -> None:
    """Each head gets d_model / n_head channels, so the split must be exact."""
    if d_model % n_head != 0:
        raise ModelConfigError(
            f"d_model must be divisible by n_head (got d_model={d_model}, n_head={n_head}): "
            f"set model.d_model to a multiple of model.n_head"
        )

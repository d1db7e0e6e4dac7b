"""The one interface every language model implements, so the trainer and generation never branch.

A model maps token ids [B, T] and an optional state to logits [B, T, vocab_size] and a new state.
The state is whatever lets the next call continue where this one stopped: the hidden state of a
recurrent net (carried across batches for truncated BPTT) or the KV cache of an attention model
(carried across calls during generation); see state.py. Bad sizes raise a plain ValueError that
names the config key (`model.KEY`); the run layer turns it into a one-line message.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmlab.models.checkpointing import checkpointed
from lmlab.models.moe import MoE
from lmlab.models.state import State


class LanguageModel(nn.Module, ABC):
    """Abstract base: next-token logits for every position, plus the state to continue from."""

    vocab_size: int
    context_length: int | None  # most tokens one sequence may hold; None means unbounded
    activation_checkpointing: bool = False  # set by lmlab.perf (perf.activation_checkpointing); not a weight

    # Capabilities, declared by each family on its class and read by generic code, which never asks
    # which family it drives (Hugging Face's `_no_split_modules` and friends):
    # the repeated layer(s) of the stack, each called through call_block: FSDP's units of sharding and
    # what activation checkpointing recomputes; () for a model that is not a stack of like blocks
    block_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    # its state has a fixed size and can be carried across a whole split: forward(idx) with no state
    # returns the state after idx, a recurrent or state-space summary of all it has read, to continue
    # from (truncated BPTT, data.stateful); False where the state is a KV cache that grows with the text
    carries_state: ClassVar[bool] = False
    # the state is a KVCache read only through attend(), so a fixed-shape cache (generate/graphed.py)
    # can stand in for it and a one-token step can be replayed as a CUDA graph
    supports_static_cache: ClassVar[bool] = False

    @abstractmethod
    def forward(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """idx: LongTensor [B, T] -> (logits [B, T, vocab_size], new_state)."""

    @abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str) -> State | None:
        """The state before any token: zero hidden state (recurrent) or an empty cache."""

    def call_block(self, block: nn.Module, *args: Any) -> Any:
        """block(*args). With activation checkpointing on, while training with gradients, only the
        block's inputs are kept for the backward pass, which runs the block again (checkpointing.py):
        activation memory no longer grows with the depth, for about one more forward per step."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed(block, *args)
        return block(*args)

    def has_data_dependent_shapes(self) -> bool:
        """True when a forward's tensor shapes depend on the token values, which rules out replaying it
        as a CUDA graph. A layer class declares it (`data_dependent_shapes = True`: mixture-of-experts
        routing picks how many tokens each expert gets); whether a model has such a layer depends on
        its settings (model.moe.n_experts), so this asks the built model."""
        return any(getattr(type(m), "data_dependent_shapes", False) for m in self.modules())

    def aux_loss(self) -> Tensor | None:
        """The weighted load-balancing loss of the last forward's mixture-of-experts layers (their
        mean), to add to the training loss; None for a model without experts."""
        losses = [m.weighted_loss for m in self.modules() if isinstance(m, MoE) and m.weighted_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token at sequence length `seq_len` (default: the context length):
        6N for the weights (2 per weight forward, 4 backward) plus 3x the forward FLOPs of the
        sequence mixing that no weight accounts for (attention scores, the SSM scan). docs/models.md."""
        length = self.context_length if seq_len is None else seq_len
        return 6 * self.matmul_parameters() + 3 * self.mixing_flops(length)

    def matmul_parameters(self) -> int:
        """N of 6N: every parameter a token passes through. Embedding tables that are only looked up
        (position tables, an untied input embedding) are left out; a tied one counts once, as the
        output layer. Experts a token is not routed to are left out (top_k of n_experts run)."""
        in_linear = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        lookups = sum(
            m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding) and id(m.weight) not in in_linear
        )
        idle_experts = sum(m.idle_parameters() for m in self.modules() if isinstance(m, MoE))
        return count_parameters(self) - lookups - idle_experts

    def mixing_flops(self, seq_len: int | None) -> int:
        """Forward FLOPs per token of sequence mixing outside the weights; none for pure recurrences."""
        return 0

    def _unpad(self, logits: Tensor) -> Tensor:
        """Drop the logits of padding rows, so padding never changes the probabilities."""
        return logits if logits.size(-1) == self.vocab_size else logits[..., : self.vocab_size]


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
            raise ValueError(f"{key} must be >= 1 (got {value}): set model.{key} to a positive integer")


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1) (got {dropout}): set model.dropout to e.g. 0.1")


def check_heads(d_model: int, n_head: int) -> None:
    """Each head gets d_model / n_head channels, so the split must be exact."""
    if d_model % n_head != 0:
        raise ValueError(
            f"d_model must be divisible by n_head (got d_model={d_model}, n_head={n_head}): "
            f"set model.d_model to a multiple of model.n_head"
        )


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)} (got {value!r}): set model.{key} to one of them")


def check_period(key: str, every: int, n_layer: int, what: str) -> None:
    """A layer pattern that repeats every `every` layers must fit the stack at least once."""
    check_sizes(**{key: every})
    if every > n_layer:
        raise ValueError(
            f"{key}={every} is longer than the stack (n_layer={n_layer}), so no layer would be {what}: "
            f"set model.{key} <= model.n_layer"
        )

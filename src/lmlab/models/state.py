"""What a model carries from one call to the next, and the two things callers do to it.

A state is None, a Tensor or tuple of Tensors with the batch on dim 1 (recurrent hidden states,
[n_layer, B, d]), or one of the containers below. Callers never look inside: truncated BPTT
cuts its history (`detach_state`) and beam search or batching keeps some rows (`select_state`).
Every container therefore implements `detach()` and `index_select(index)`. Checkpoints hold only
plain data (read with weights_only=True), so `state_to_data`/`state_from_data` convert for them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def causal_mask(n_new: int, n_cached: int, device: torch.device) -> Tensor:
    """Boolean mask [n_new, n_cached + n_new]: new token i sees every cached token and the new
    tokens up to itself."""
    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool, device=device).tril(diagonal=n_cached)


class KVCache:
    """Keys and values of the tokens seen so far, for every attention layer, preallocated (as in litgpt).

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

    @classmethod
    def holding(cls, k: Tensor, v: Tensor, length: int) -> KVCache:
        """A cache over existing buffers (a saved state read back), `length` of their positions filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length = k, v, length
        return cache

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

    def mask(self, n_new: int, device: torch.device) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for `n_new` queries over the keys `update` returned. SDPA's is_causal
        aligns its mask top-left, which is only right while nothing is cached; after that the queries
        are the last n_new keys and the mask is aligned bottom-right (one new token sees them all)."""
        if self.length == 0:
            return None, True
        return (causal_mask(n_new, self.length, device) if n_new > 1 else None), False

    def new_positions(self, n_new: int, device: torch.device) -> Tensor:
        """Positions of `n_new` tokens fed next: they follow the cached ones."""
        return torch.arange(self.length, self.length + n_new, device=device)

    def index_select(self, index: Tensor) -> KVCache:
        """A new cache holding batch rows `index` (repeats allowed), the same length."""
        cache = copy.copy(self)
        cache.k, cache.v = self.k.index_select(1, index), self.v.index_select(1, index)
        return cache

    def detach(self) -> KVCache:
        cache = copy.copy(self)
        cache.k, cache.v = self.k.detach(), self.v.detach()
        return cache


@dataclass
class SSMCache:
    """Mamba's constant-size recurrent state: the last d_conv-1 inputs of every layer's causal
    convolution [n_layer, B, d_inner, d_conv-1] and the SSM state [n_layer, B, d_inner, d_state].
    It never grows with the context, which is why Mamba's generation cost per token stays flat."""

    conv: Tensor
    ssm: Tensor

    def index_select(self, index: Tensor) -> SSMCache:
        return SSMCache(self.conv.index_select(1, index), self.ssm.index_select(1, index))

    def detach(self) -> SSMCache:
        return SSMCache(self.conv.detach(), self.ssm.detach())


@dataclass
class HybridCache:
    """A hybrid stack's state: its attention layers' KV cache and its Mamba layers' SSMCache."""

    kv: KVCache
    ssm: SSMCache

    def index_select(self, index: Tensor) -> HybridCache:
        return HybridCache(self.kv.index_select(index), self.ssm.index_select(index))

    def detach(self) -> HybridCache:
        return HybridCache(self.kv.detach(), self.ssm.detach())


@dataclass
class MemoryState:
    """An LSTM with attention over its past: the LSTM's (h, c) [n_layer, B, d] and the keys and
    values of at most `window` previous top-layer outputs [B, n_head, m, head_dim], m <= window."""

    hidden: tuple[Tensor, Tensor]
    keys: Tensor
    values: Tensor

    def index_select(self, index: Tensor) -> MemoryState:
        h, c = self.hidden
        return MemoryState(
            (h.index_select(1, index), c.index_select(1, index)),
            self.keys.index_select(0, index),
            self.values.index_select(0, index),
        )

    def detach(self) -> MemoryState:
        h, c = self.hidden
        return MemoryState((h.detach(), c.detach()), self.keys.detach(), self.values.detach())


Container = KVCache | SSMCache | HybridCache | MemoryState
State = Tensor | tuple["State", ...] | Container


def detach_state(state: State | None) -> State | None:
    """Cut the autograd history of a carried state, so truncated BPTT backpropagates through
    one batch only instead of through every batch since the start of the epoch."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple):
        return tuple(detach_state(s) for s in state)
    if isinstance(state, Container):
        return state.detach()
    raise TypeError(f"detach_state expects None, a Tensor, a tuple or a model state, got {type(state).__name__}")


def select_state(state: State | None, index: Tensor) -> State | None:
    """Batch rows `index` of a state (repeats allowed): beam search follows its surviving beams
    this way, and a batch can drop finished rows. Tensors keep the batch on dim 1."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.index_select(1, index)
    if isinstance(state, tuple):
        return tuple(select_state(s, index) for s in state)
    if isinstance(state, Container):
        return state.index_select(index)
    raise TypeError(f"select_state expects None, a Tensor, a tuple or a model state, got {type(state).__name__}")


def state_to_data(state: State | None) -> object:
    """Tensors, tuples, dicts and ints only, so a checkpoint can carry the state and still be read
    with torch.load(weights_only=True), which never runs code from the file."""
    if state is None or isinstance(state, Tensor):
        return state
    if isinstance(state, tuple):
        return tuple(state_to_data(s) for s in state)
    if isinstance(state, KVCache):
        return {"kind": "KVCache", "k": state.k, "v": state.v, "length": state.length}
    if isinstance(state, Container):
        return {"kind": type(state).__name__, **{f.name: state_to_data(getattr(state, f.name)) for f in fields(state)}}
    raise TypeError(f"state_to_data expects None, a Tensor, a tuple or a model state, got {type(state).__name__}")


def state_from_data(data: object) -> State | None:
    """The state that `state_to_data` turned into `data`."""
    if data is None or isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)):
        return tuple(state_from_data(d) for d in data)
    kinds = {cls.__name__: cls for cls in (KVCache, SSMCache, HybridCache, MemoryState)}
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        raise ValueError(f"not a saved model state: {type(data).__name__} {str(data)[:60]!r}")
    if data["kind"] == "KVCache":
        return KVCache.holding(data["k"], data["v"], data["length"])
    return kinds[data["kind"]](**{key: state_from_data(value) for key, value in data.items() if key != "kind"})

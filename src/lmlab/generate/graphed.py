"""One-token generation steps of an attention model replayed as a CUDA graph.

At batch 1 a step of GPT-2 small is about a hundred small kernels, and launching them from Python
takes longer than running them: the GPU waits on the host. A CUDA graph launches the whole step
at once. A graph replays fixed shapes at fixed addresses, so the step runs over a StaticKVCache:
the model's own KV cache buffers, every position read (those not written yet masked), written at
a position held in a device tensor set before each replay. The prompt and any re-read of a full
context run eagerly into the same buffers as a plain KVCache. Same logits as the eager step, to
rounding (tested). Models whose state is a KVCache read only through attend() declare
`supports_static_cache`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lmlab.graphed_step import capturing
from lmlab.models import KVCache, LanguageModel

WARMUP_STEPS = 2  # eager steps on a side stream before capture: what cuBLAS and SDPA set up on first use


def can_graph(model: LanguageModel, device: torch.device) -> bool:
    """Whether `GraphedStep` can drive this model here: a model that supports a static cache, on a GPU, in
    eval mode, in one process (under FSDP a step gathers weights from the other ranks, which a graph
    cannot replay)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return model.supports_static_cache and device.type == "cuda" and not model.training and not distributed


class StaticKVCache(KVCache):
    """A KVCache's buffers seen with fixed shapes, for a one-token step that a CUDA graph can replay.

    `update` writes the new token at `position` (a one-element device tensor, set before each replay)
    and returns every position of the buffers; `mask` hides the positions after it, not written yet.
    `length` is the host's count of the tokens before `position`, kept for the context-length check.
    """

    def __init__(self, cache: KVCache, position: Tensor) -> None:
        self.k, self.v, self.length = cache.k, cache.v, cache.length
        self.position = position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer].index_copy_(2, self.position, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.position, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def mask(self, n_new: int, device: torch.device) -> tuple[Tensor, bool]:
        return (torch.arange(self.max_length, device=device) <= self.position)[None], False

    def new_positions(self, n_new: int, device: torch.device) -> Tensor:
        return self.position


class GraphedStep:
    """A model's one-token step over one KV cache (`cache`), captured on first use and replayed after.

    The owner fills the cache eagerly (`reset()`, then the model on the prompt into it), then calls
    `step(token)` once per new token: the step writes position `cache.length` through a StaticKVCache
    over the same buffers, reads every position up to it, and the count moves on by one. On a CPU the
    same fixed-shape step runs without a graph.
    """

    def __init__(self, model: LanguageModel, batch_size: int, device: torch.device) -> None:
        self.model = model
        self.cache: KVCache = model.init_state(batch_size, device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.static = StaticKVCache(self.cache, self.position)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = device.type != "cuda"  # no graph (a CPU, or capture failed): the same step op by op
        self.logits: Tensor | None = None

    def reset(self) -> KVCache:
        """The cache, emptied for an eager read (its buffers kept: the graph reads them)."""
        self.cache.length = 0
        return self.cache

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed `token` [B] at position `cache.length`; the logits [B, V] of the token after it."""
        self.token.copy_(token[:, None])
        self.position.fill_(self.cache.length)
        if self.graph is None and not self.eager:
            try:
                self._capture()
            except RuntimeError as err:  # an op that cannot be captured: the same step, launched op by op
                warnings.warn(f"generation steps run without a CUDA graph: capture failed ({err})", stacklevel=2)
                self.eager = True
        if self.eager:
            logits = self._run()
        else:
            self.graph.replay()
            logits = self.logits
        self.cache.length += 1
        return logits[:, -1].clone()  # a replay overwrites the graph's output

    def _run(self) -> Tensor:
        """The step the graph records; the cache's count is left to `step`."""
        self.static.length = self.cache.length
        logits, _ = self.model(self.token, self.static)
        return logits

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # each writes the step's own position, which the replay rewrites first
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, self.position.device):
            self.logits = self._run()
        self.graph = graph

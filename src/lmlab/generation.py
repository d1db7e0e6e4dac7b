"""Autoregressive generation for any lmlab model: one model step per new token.

Attention models keep a KV cache and recurrent models their hidden state, both behind the models'
common `init_state`/`forward(idx, state)` interface, so this file never asks which architecture it
drives. `IncrementalDecoder` holds that state; sampling (`stream_tokens`) and beam search
(`lmlab.beam_search`) both drive it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor

from lmlab.errors import ConfigError
from lmlab.models import KVCache, LanguageModel
from lmlab.models.base import State


def check_sampling(
    *,
    max_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    num_samples: int = 1,
) -> None:
    """Reject sampling settings that have no meaning, naming the key and its valid range."""
    problems = [
        (max_new_tokens < 0, f"max_new_tokens must be >= 0 (got {max_new_tokens})"),
        (temperature < 0, f"temperature must be >= 0, 0 meaning greedy (got {temperature})"),
        (top_k is not None and top_k < 1, f"top_k must be >= 1, or null for no limit (got {top_k})"),
        (top_p is not None and not 0 < top_p <= 1, f"top_p must be in (0, 1], or null for no limit (got {top_p})"),
        (num_beams < 1, f"num_beams must be >= 1, 1 meaning no beam search (got {num_beams})"),
        (num_samples < 1, f"num_samples must be >= 1 (got {num_samples})"),
        (
            num_beams > 1 and num_samples > num_beams,
            f"num_samples={num_samples} exceeds num_beams={num_beams}: beam search returns at most num_beams texts",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`
    (nucleus sampling, Holtzman et al. 2020); the others get -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def select_batch(state: State | None, index: Tensor) -> State | None:
    """Rows `index` of a state's batch, e.g. to follow the surviving beams.

    Every lmlab state keeps the batch on dim 1: a recurrent hidden state is [n_layer, B, d] and
    a KVCache [n_layer, B, heads, T, head_dim].
    """
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.index_select(1, index)
    if isinstance(state, tuple):
        return tuple(select_batch(s, index) for s in state)
    if isinstance(state, KVCache):
        cache = copy.copy(state)
        cache.k, cache.v = state.k.index_select(1, index), state.v.index_select(1, index)
        return cache
    raise TypeError(f"select_batch expects None, a Tensor, a tuple or a KVCache, got {type(state).__name__}")


class IncrementalDecoder:
    """A model and its state, fed one token per step: `logits` are always those of the next token.

    Prompts longer than the model's context keep their last window. When an attention model's
    cache fills up, the last half-context is re-read into a fresh cache, so positions stay within
    what the model was trained on and the cost stays one step per token on average.

    `cached=False` re-runs the whole prefix (its last window) every step instead: the same logits
    while the text fits the context, at O(T) model positions per token rather than one. Tests and
    the benchmark compare the two.
    """

    @torch.no_grad()
    def __init__(self, model: LanguageModel, prompt: Tensor, *, cached: bool = True) -> None:
        self.model, self.cached = model, cached
        self.window = model.context_length
        self.tokens = self._crop(prompt)  # what an uncached step re-reads
        self.state: State | None = None
        self.logits = self._read(self.tokens)

    def _crop(self, tokens: Tensor) -> Tensor:
        return tokens if self.window is None else tokens[:, -self.window :]

    def _read(self, tokens: Tensor) -> Tensor:
        """Run `tokens` from an empty state; returns the last position's logits [B, V]."""
        state = self.model.init_state(tokens.size(0), tokens.device) if self.cached else None
        logits, self.state = self.model(tokens, state)
        self.fed = tokens.size(1)  # tokens in the state
        return logits[:, -1]

    @torch.no_grad()
    def append(self, token: Tensor) -> Tensor:
        """Feed the chosen tokens [B]; returns the logits of the token after them."""
        self.tokens = self._crop(torch.cat([self.tokens, token[:, None]], dim=1))
        if not self.cached:
            self.logits = self._read(self.tokens)
        elif self.window is not None and self.fed + 1 > self.window:
            self.logits = self._read(self.tokens[:, -max(1, self.window // 2) :])
        else:
            logits, self.state = self.model(token[:, None], self.state)
            self.fed += 1
            self.logits = logits[:, -1]
        return self.logits

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (repeats allowed): beam search follows its best beams this way."""
        self.tokens, self.logits = self.tokens[index], self.logits[index]
        self.state = select_batch(self.state, index)


@torch.no_grad()
def stream_tokens(
    model: LanguageModel,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cached: bool = True,
) -> Iterator[Tensor]:
    """Yield each new token [B] as soon as it is chosen."""
    if max_new_tokens == 0:
        return
    decoder = IncrementalDecoder(model, prompt, cached=cached)
    for step in range(max_new_tokens):
        token = next_token(decoder.logits, temperature, top_k, top_p, generator)
        yield token
        if step + 1 < max_new_tokens:  # the last token needs no logits after it
            decoder.append(token)

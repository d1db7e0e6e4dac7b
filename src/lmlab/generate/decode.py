"""Autoregressive decoding for any lmlab model: one model step per new token, sampled or by beam search.

Attention models keep a KV cache and recurrent models their hidden state, both behind the models'
common `init_state`/`forward(idx, state)` interface, so this file never asks which architecture it
drives. `IncrementalDecoder` holds that state; sampling (`stream_tokens`) and `beam_search` both drive it.
All beams run as one batch: when a beam is dropped and a better one duplicated, the decoder's state
is reordered with it instead of being recomputed. lmlab's models have no end-of-text token to stop
on, so every beam has the same length and no length penalty is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lmlab.generate.graphed import GraphedStep, can_graph
from lmlab.generate.sampling import next_token
from lmlab.models import LanguageModel, State, select_state


class IncrementalDecoder:
    """A model and its state, fed one token per step: `logits` are always those of the next token.

    Prompts longer than the model's context keep their last window. When an attention model's
    cache fills up, the last half-context is re-read into a fresh cache, so positions stay within
    what the model was trained on and the cost stays one step per token on average.

    `cached=False` re-runs the whole prefix (its last window) every step instead: the same logits
    while the text fits the context, at O(T) model positions per token rather than one. Tests and
    the benchmark compare the two.

    `cuda_graph=True` replays each one-token step of an attention model on a GPU as a CUDA graph
    (generate/graphed.py); the prompt and re-reads stay eager.
    """

    @torch.no_grad()
    def __init__(self, model: LanguageModel, prompt: Tensor, *, cached: bool = True, cuda_graph: bool = False) -> None:
        self.model, self.cached = model, cached
        self.window = model.context_length
        self.tokens = self._crop(prompt)  # what an uncached step re-reads
        self.state: State | None = None
        self.graphed = GraphedStep(model, prompt.size(0), prompt.device) if cuda_graph and cached else None
        self.logits = self._read(self.tokens)

    def _crop(self, tokens: Tensor) -> Tensor:
        return tokens if self.window is None else tokens[:, -self.window :]

    def _read(self, tokens: Tensor) -> Tensor:
        """Run `tokens` from an empty state; returns the last position's logits [B, V]."""
        if self.graphed is not None:
            state = self.graphed.reset()  # the buffers the graph reads
        else:
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
        elif self.graphed is not None:
            self.logits = self.graphed.step(token)
            self.fed += 1
        else:
            logits, self.state = self.model(token[:, None], self.state)
            self.fed += 1
            self.logits = logits[:, -1]
        return self.logits

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (repeats allowed): beam search follows its best beams this way."""
        if self.graphed is not None:
            raise ValueError("a CUDA-graphed decoder keeps its batch rows: reorder needs cuda_graph=False")
        self.tokens, self.logits = self.tokens[index], self.logits[index]
        self.state = select_state(self.state, index)


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
    cuda_graph: bool | None = None,
) -> Iterator[Tensor]:
    """Yield each new token [B] as soon as it is chosen. `cuda_graph` (None: wherever it can run,
    `can_graph`) replays each step of an attention model on a GPU as one CUDA graph."""
    if max_new_tokens == 0:
        return
    if cuda_graph is None:
        cuda_graph = cached and can_graph(model, prompt.device)
    decoder = IncrementalDecoder(model, prompt, cached=cached, cuda_graph=cuda_graph)
    for step in range(max_new_tokens):
        token = next_token(decoder.logits, temperature, top_k, top_p, generator)
        yield token
        if step + 1 < max_new_tokens:  # the last token needs no logits after it
            decoder.append(token)


@dataclass(frozen=True)
class Beam:
    tokens: list[int]  # the new tokens, without the prompt
    log_prob: float  # natural log of the continuation's probability given the prompt


@torch.no_grad()
def beam_search(model: LanguageModel, prompt: Tensor, max_new_tokens: int, num_beams: int) -> list[Beam]:
    """The `num_beams` best continuations of `prompt` [1, T], most likely first."""
    if max_new_tokens == 0:
        return [Beam([], 0.0)]
    decoder = IncrementalDecoder(model, prompt)
    decoder.reorder(torch.zeros(num_beams, dtype=torch.long, device=prompt.device))
    # only the first beam is live at the start, or the beams would all pick the same tokens
    scores = torch.full((num_beams,), float("-inf"), device=prompt.device)
    scores[0] = 0.0
    history = torch.zeros(num_beams, 0, dtype=torch.long, device=prompt.device)
    for step in range(max_new_tokens):
        candidates = scores[:, None] + decoder.logits.float().log_softmax(-1)  # [beams, V]
        vocab = candidates.size(-1)
        scores, flat = candidates.flatten().topk(min(num_beams, candidates.numel()))
        parents, tokens = flat // vocab, flat % vocab
        history = torch.cat([history[parents], tokens[:, None]], dim=1)
        if step + 1 < max_new_tokens:
            decoder.reorder(parents)
            decoder.append(tokens)
    live = torch.isfinite(scores)
    return [Beam(history[i].tolist(), float(scores[i])) for i in range(len(scores)) if live[i]]

"""Autoregressive generation for any lmlab model: one model step per new token.

Attention models keep a KV cache and recurrent models their hidden state, both behind the models'
common `init_state`/`forward(idx, state)` interface, so this file never asks which architecture it
drives.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lmlab.models import LanguageModel


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_tokens(model: LanguageModel, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Yield each new token [B] as soon as it is chosen.

    Prompts longer than the model's context keep their last window. When an attention model's
    cache fills up, the last half-context is re-read into a fresh cache, so positions stay within
    what the model was trained on and the cost stays one step per token on average.
    """
    window = model.context_length
    if window is not None:
        prompt = prompt[:, -window:]
    state = model.init_state(prompt.size(0), prompt.device)
    logits, state = model(prompt, state)
    fed, recent = prompt.size(1), prompt
    for _ in range(max_new_tokens):
        token = next_token(logits[:, -1], temperature, top_k, top_p, generator)
        yield token
        recent = torch.cat([recent, token[:, None]], dim=1)
        if window is not None:
            recent = recent[:, -window:]
            if fed + 1 > window:
                keep = recent[:, -max(1, window // 2):]
                state = model.init_state(prompt.size(0), prompt.device)
                logits, state = model(keep, state)
                fed = keep.size(1)
                continue
        logits, state = model(token[:, None], state)
        fed += 1


def generate(model: LanguageModel, prompt: Tensor, max_new_tokens: int, **sampling) -> Tensor:
    """Return prompt + `max_new_tokens` sampled tokens as one [B, T] tensor."""
    new = list(stream_tokens(model, prompt, max_new_tokens, **sampling))
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt

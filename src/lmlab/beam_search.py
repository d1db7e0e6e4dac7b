"""Beam search: the `num_beams` most likely continuations, kept step by step.

All beams run as one batch through an `IncrementalDecoder`, so each step costs one model call for
every beam together; when a beam is dropped and a better one duplicated, the decoder's state
(KV cache or hidden state) is reordered with it instead of being recomputed. lmlab's models have
no end-of-text token to stop on, so every beam has the same length and no length penalty is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmlab.generation import IncrementalDecoder
from lmlab.models import LanguageModel


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

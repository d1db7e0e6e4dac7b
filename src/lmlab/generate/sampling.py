"""How the next token is chosen: one validated set of sampling settings, and the filters it applies.

`SamplingConfig` is built from the one `sample` config node that the end-of-run sample, the
validation samples and `generate.py` share, and refuses meaningless settings in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from lmlab.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """What to start from and how to draw; temperature 0 is greedy, num_beams > 1 is beam search."""

    prompt: str = ""
    max_new_tokens: int = 300
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    num_samples: int = 1
    seed: int = 0
    cuda_graph: bool | str = "auto"  # each step one replayed CUDA graph: auto (attention models on a GPU), or a bool

    def __post_init__(self) -> None:
        problems = [
            (self.max_new_tokens < 0, f"max_new_tokens must be >= 0 (got {self.max_new_tokens})"),
            (self.temperature < 0, f"temperature must be >= 0, 0 meaning greedy (got {self.temperature})"),
            (
                self.top_k is not None and self.top_k < 1,
                f"top_k must be >= 1, or null for no limit (got {self.top_k})",
            ),
            (
                self.top_p is not None and not 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], or null for no limit (got {self.top_p})",
            ),
            (self.num_beams < 1, f"num_beams must be >= 1, 1 meaning no beam search (got {self.num_beams})"),
            (self.num_samples < 1, f"num_samples must be >= 1 (got {self.num_samples})"),
            (
                self.cuda_graph not in ("auto", True, False),
                f"cuda_graph must be auto, true or false (got {self.cuda_graph!r})",
            ),
            (
                self.num_beams > 1 and self.num_samples > self.num_beams,
                f"num_samples={self.num_samples} exceeds num_beams={self.num_beams}: "
                "beam search returns at most num_beams texts",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)

    @classmethod
    def from_config(cls, node: Any, **overrides: Any) -> SamplingConfig:
        """The settings of a config node (extra keys ignored), with `overrides` on top."""
        settings = {f.name: node[f.name] for f in fields(cls) if f.name in node}
        settings.update(overrides)
        prompt = settings.get("prompt")
        settings["prompt"] = "" if prompt is None else str(prompt)
        return cls(**settings)


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

"""The numbers every run and every evaluation report, defined once.

Bits per byte = (total cross-entropy of a text in bits) / (UTF-8 bytes of that raw text). Unlike
per-token loss or perplexity it does not depend on how the text was tokenized, so it ranks char,
word and BPE runs on one scale. The task's validation/test passes and `evaluate.py` both score
through `token_nats` and `bits_per_byte`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmlab.data.windows import IGNORE_INDEX

LN2 = math.log(2)
SPLIT_METRICS = ("loss", "ppl", "bpb", "unk_rate")  # logged as "<split>/<name>", e.g. "val/bpb"


def token_nats(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0, reduction: str = "sum") -> Tensor:
    """Cross-entropy in nats of `targets` [B, T] under `logits` [B, T, V], in fp32; padding (IGNORE_INDEX) is free."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def bits_per_byte(nats: float | Tensor, n_bytes: float | Tensor) -> float | Tensor:
    """Total nats of a text over its UTF-8 byte count, in bits per byte."""
    return nats / LN2 / n_bytes


def split_scores(split: str, nats: Tensor, tokens: Tensor, n_bytes: float) -> dict[str, Tensor]:
    """`<split>/loss`, `/ppl` and `/bpb` from a pass's summed nats, scored tokens and raw bytes."""
    loss = nats / tokens.clamp(min=1)
    return {
        f"{split}/loss": loss.float(),
        f"{split}/ppl": torch.exp(loss).float(),
        f"{split}/bpb": torch.as_tensor(bits_per_byte(nats, n_bytes)).float(),
    }

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
from torch.utils.checkpoint import checkpoint

from lmlab.data.windows import IGNORE_INDEX

LN2 = math.log(2)
SPLIT_METRICS = ("loss", "ppl", "bpb", "unk_rate")  # logged as "<split>/<name>", e.g. "val/bpb"


def token_nats(
    logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0, reduction: str = "sum", chunk_rows: int = 0
) -> Tensor:
    """Cross-entropy in nats of `targets` [B, T] under `logits` [B, T, V], in fp32; padding (IGNORE_INDEX) is free.

    `chunk_rows` > 0 scores that many positions at a time, each chunk upcast to fp32 inside an
    activation checkpoint: the fp32 copy of the logits (B x T x V x 4 bytes, 6.6 GB for GPT-2 at
    32 x 1024) never exists whole, in the forward or the backward pass. Same numbers either way.
    """
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    if chunk_rows <= 0 or flat_logits.size(0) <= chunk_rows:
        return _nats(flat_logits, flat_targets, label_smoothing, reduction)
    parts = [
        checkpoint(
            _nats, chunk, chunk_targets, label_smoothing, "none" if reduction == "none" else "sum", use_reentrant=False
        )
        for chunk, chunk_targets in zip(flat_logits.split(chunk_rows), flat_targets.split(chunk_rows))
    ]
    if reduction == "none":
        return torch.cat(parts)
    total = torch.stack(parts).sum()
    return total / (flat_targets != IGNORE_INDEX).sum() if reduction == "mean" else total


def _nats(logits: Tensor, targets: Tensor, label_smoothing: float, reduction: str) -> Tensor:
    return F.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction=reduction
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

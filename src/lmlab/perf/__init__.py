"""The speed layer: one config node (`perf:`), applied once to the model and the training step (apply.py)."""

from lmlab.perf.apply import (
    apply_perf,
    cuda_graph_obstacle,
    dynamo_settings,
    fast_loss,
    pinned_attention,
    training_graph,
)
from lmlab.perf.attention import SHORT_CPU_CONTEXT, attention_context, auto_attention
from lmlab.perf.config import Perf

__all__ = [
    "SHORT_CPU_CONTEXT",
    "Perf",
    "apply_perf",
    "attention_context",
    "auto_attention",
    "cuda_graph_obstacle",
    "dynamo_settings",
    "fast_loss",
    "pinned_attention",
    "training_graph",
]

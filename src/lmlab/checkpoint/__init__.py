"""Checkpoints: what one holds and how it is read (format), written (atomic_io) and resumed (resume)."""

from lmlab.checkpoint.format import (
    FORMAT_VERSION,
    HASH_SWITCH,
    SECTION,
    LoadedCheckpoint,
    build_model,
    hash_switch,
    load_checkpoint,
    load_weights,
    model_weights,
    read_checkpoint,
    resolve_device,
    run_record,
)

__all__ = [
    "FORMAT_VERSION",
    "HASH_SWITCH",
    "SECTION",
    "LoadedCheckpoint",
    "build_model",
    "hash_switch",
    "load_checkpoint",
    "load_weights",
    "model_weights",
    "read_checkpoint",
    "resolve_device",
    "run_record",
]

"""Checkpoints: what one holds and how it is read (format), written (atomic_io) and resumed (resume)."""

from lmlab.checkpoint.format import (
    FORMAT_VERSION,
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
    verify_hash_setting,
)

__all__ = [
    "FORMAT_VERSION",
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
    "verify_hash_setting",
]

"""Checkpoint files that are never half-written, whenever the process dies.

Lightning's `TorchCheckpointIO` saves through an fsspec transaction whose temporary file lives in
the system temp folder: the final move can be a copy across file systems, and nothing is fsynced,
so a kill or power cut mid-save can leave a truncated `last.ckpt` that a resume would trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lmlab.checkpoint.format import HASH_KEY, SECTION, tensors_sha256
from lmlab.io import atomic_open
from lmlab.lightning_compat import is_local_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each checkpoint to a temporary file beside its target, fsyncs it, then renames it.

    A reader sees the previous checkpoint or the new one, never part of one. The lmlab section gets
    the hash of the tensors (lmlab.checkpoint.format.tensors_sha256), so a reader also notices bits
    flipped later. Remote paths (s3://, gs://) keep Lightning's own upload, which is already all-or-nothing.
    Wired in by `plugins:` in conf/trainer/default.yaml.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if isinstance(checkpoint.get(SECTION), dict):
            checkpoint = {**checkpoint, SECTION: {**checkpoint[SECTION], HASH_KEY: tensors_sha256(checkpoint)}}
        with atomic_open(path) as f:
            torch.save(checkpoint, f)

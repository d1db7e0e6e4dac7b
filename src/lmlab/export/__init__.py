"""Export trained lmlab models to Hugging Face transformers: each model class whose exporter module
here registers it (lmlab.export.registry) becomes one transformers class."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from lmlab.checkpoint import load_checkpoint, verify_hash_setting
from lmlab.export.hf_dir import export_model
from lmlab.export.registry import exporter_for, exporters, register_exporter
from lmlab.models import count_parameters

__all__ = ["export_from_config", "export_model", "exporter_for", "exporters", "register_exporter"]


def export_from_config(cfg: DictConfig) -> Path:
    """What `python export.py ckpt=... out=...` runs: the checkpoint's model and tokenizer to `out`."""
    # the command says what it wrote in one line; a progress bar for saving one file is noise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    loaded = load_checkpoint(cfg.ckpt, verify_hash=verify_hash_setting(cfg))
    out = export_model(loaded.model, loaded.tokenizer, cfg.out)
    exporter = exporter_for(loaded.model)
    print(
        f"wrote {out}: {exporter.hf_model} ({count_parameters(loaded.model):,} parameters) and its "
        f"{loaded.tokenizer.name} tokenizer; load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer.from_pretrained(...)"
    )
    return out

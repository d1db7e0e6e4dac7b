"""Write a transformers model directory: config.json, model.safetensors and the tokenizer files.

The directory is built beside `out` and renamed into place, so an interrupted export never leaves a
half-written model that transformers would load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError
from lmlab.export.registry import exporter_for
from lmlab.models import LanguageModel
from lmlab.tokenizers import Tokenizer


def _transformers() -> Any:
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers
    except ImportError:
        raise ConfigError(
            "export needs the transformers and safetensors packages: pip install transformers safetensors "
            "(or pip install -e '.[dev]')"
        ) from None
    return transformers


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out={out} already exists and is not an empty folder: choose a new folder")


def export_model(model: LanguageModel, tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write `model` and `tokenizer` as a transformers directory `out` (from_pretrained loads it)."""
    exporter = exporter_for(model)
    out = Path(out).expanduser()
    _check_out(out)
    transformers = _transformers()
    if tokenizer.vocab_size != model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model {model.vocab_size}: "
            "export a model with the tokenizer it was trained with"
        )
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.hf_tokenizer(),
        model_max_length=model.context_length,
        clean_up_tokenization_spaces=False,  # decoding must give the text back as lmlab does
        **tokenizer.special_tokens(),
    )
    eos = hf_tokenizer.eos_token_id  # None when the vocabulary has no end-of-text token
    # no padding id: a config's default (Mamba2Config's is 1) names a real token, which generate()
    # would then mask out of every prompt given without an attention mask
    config = getattr(transformers, exporter.hf_config)(
        **exporter.config(model),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
        architectures=[exporter.hf_model],
    )
    hf_model = getattr(transformers, exporter.hf_model)(config)
    hf_model.load_state_dict(exporter.weights(model), strict=True)
    hf_model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # an empty `out` is replaced; anything else was refused above
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

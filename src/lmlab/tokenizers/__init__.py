"""Tokenizers: text <-> int32 ids. They know nothing of models, Lightning or Hydra."""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import FORMAT_V1, Tokenizer, read_document
from lmlab.tokenizers.bpe import BPETokenizer
from lmlab.tokenizers.bytes import ByteTokenizer
from lmlab.tokenizers.char import CharTokenizer
from lmlab.tokenizers.pretrained import PretrainedTokenizer
from lmlab.tokenizers.unigram import UnigramTokenizer
from lmlab.tokenizers.word import WordTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "PretrainedTokenizer",
    "Tokenizer",
    "UnigramTokenizer",
    "WordTokenizer",
    "load_tokenizer",
    "tokenizer_from_json",
]

_CLASSES: dict[str, type[Tokenizer]] = {
    cls.name: cls
    for cls in (CharTokenizer, WordTokenizer, BPETokenizer, UnigramTokenizer, ByteTokenizer, PretrainedTokenizer)
}

# Settings that version-1 files predate, with the behaviour those files had: word tokenizers were closed.
_V1_SETTINGS = {"word": {"unk": True}}


def load_tokenizer(path_or_json: str | Path) -> Tokenizer:
    """Rebuild a saved tokenizer exactly, from a file path or from a `to_json()` string."""
    if isinstance(path_or_json, str) and path_or_json.lstrip().startswith("{"):
        return tokenizer_from_json(path_or_json, "the JSON string")
    try:
        text = Path(path_or_json).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"tokenizer file {path_or_json} cannot be read ({err}): retrain, or use the run's tokenizer.json"
        ) from None
    return tokenizer_from_json(text, str(path_or_json))


def tokenizer_from_json(text: str, source: str) -> Tokenizer:
    """Rebuild a tokenizer from its JSON text only (what checkpoints hold): never read as a path."""
    version, name, settings, state = read_document(text, source)
    if name not in _CLASSES:
        raise ConfigError(f"{source} names tokenizer {name!r}; lmlab has {', '.join(sorted(_CLASSES))}")
    if version == FORMAT_V1:
        settings = {**_V1_SETTINGS.get(name, {}), **settings}
    try:
        tokenizer = _CLASSES[name](**settings)
        tokenizer._load_state(state)
        tokenizer.vocab_size  # noqa: B018  (a state without a vocabulary fails here, not at first use)
    except ConfigError:
        raise
    except Exception as err:  # HF tokenizers raise plain Exception on a damaged vocabulary
        detail = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ConfigError(
            f"{source} is a damaged {name} tokenizer ({detail}): use the run's own tokenizer.json"
        ) from None
    return tokenizer

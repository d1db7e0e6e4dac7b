"""Tokenizers: text <-> int32 ids. They know nothing of models, Lightning or Hydra."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import FORMAT, FORMAT_V1, Tokenizer
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
        text, source = path_or_json, "the JSON string"
    else:
        text, source = Path(path_or_json).read_text(encoding="utf-8"), str(path_or_json)
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("format") not in (FORMAT, FORMAT_V1):
        raise ConfigError(f"{source} is not an lmlab tokenizer (expected format {FORMAT!r})")
    settings = dict(document["config"])
    name = settings.pop("name")
    if document["format"] == FORMAT_V1:
        settings = {**_V1_SETTINGS.get(name, {}), **settings}
    tokenizer = _CLASSES[name](**settings)
    tokenizer._load_state(document["state"])
    return tokenizer

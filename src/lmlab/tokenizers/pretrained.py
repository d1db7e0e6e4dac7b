"""A tokenizer someone else trained (GPT-2's, Llama 3's, ...): its tokenizer.json, read once from a
file or the Hugging Face cache and never retrained."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import try_to_load_from_cache
from tokenizers import Tokenizer as HFTokenizer

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import CHUNK_CHARS, Tokenizer, encode_in_chunks

FILE = "tokenizer.json"
# Text a tokenizer must give back exactly: spacing, line ends, accents, CJK, emoji, controls. Repeated
# past one encoding chunk, so a tokenizer that marks the start of every chunk (a SentencePiece
# prefix space) shows it too.
PROBE_LINE = (
    "Plain ASCII, then  two spaces,\ttabs, CRLF\r\nand\n\nblank lines; accents: héllo, naïve, Ærø; "
    "CJK: 日本語の文章; emoji: 😀👍🏽; controls: \x00\x07\x1b; end."
)
PROBE = "\n".join([PROBE_LINE] * (CHUNK_CHARS // len(PROBE_LINE) + 2))


def find_tokenizer_file(path: str) -> Path:
    """`path` itself, the tokenizer.json in that folder, or that of a model in the Hugging Face cache
    (e.g. "gpt2", "meta-llama/Meta-Llama-3-8B"); nothing is downloaded."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir() and (local / FILE).is_file():
        return local / FILE
    try:
        cached = try_to_load_from_cache(repo_id=path, filename=FILE)
    except ValueError:  # not a valid model name, e.g. a path that does not exist
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    if local.suffix == ".json" or local.is_absolute() or path.startswith((".", "~")):
        raise ConfigError(f"tokenizer.path={path}: no such file or folder; give the path of a tokenizer.json")
    raise ConfigError(
        f"tokenizer.path={path} is neither a tokenizer.json file, a folder holding one, nor a model in the "
        f"Hugging Face cache: pass a tokenizer.json path, or fetch it once (huggingface-cli download {path} {FILE})"
    )


class PretrainedTokenizer(Tokenizer):
    """Any Hugging Face tokenizer.json, used as it is: the vocabulary a published model was trained with.

    It is read when built from `path` and never trained on the corpus. Checkpoints store its whole
    JSON (plus the path it came from, for people to read), never a path to read again. A tokenizer
    that does not give back the text it encodes (lower-casing, Unicode normalisation, dropped
    spaces) is refused: bits per byte would then score a different, easier text than the raw bytes
    it divides by.
    """

    name = "pretrained"

    def __init__(self, path: str | None = None) -> None:
        self._hf: HFTokenizer | None = None
        self._source = ""
        self._unk_id: int | None = None
        if path is not None:
            file = find_tokenizer_file(str(path))
            try:
                hf = HFTokenizer.from_file(str(file))
            except Exception as err:  # the Rust library's parse errors are plain Exceptions
                raise ConfigError(f"tokenizer.path={path}: {file} is not a tokenizer.json ({err})") from err
            self._set(hf, str(path))

    def _set(self, hf: HFTokenizer, source: str) -> None:
        self._hf, self._source = hf, source
        model = json.loads(hf.to_str())["model"]
        unk = model.get("unk_token")
        self._unk_id = hf.token_to_id(unk) if isinstance(unk, str) else model.get("unk_id")
        decoded = self._decode(self._encode(PROBE).tolist())
        if decoded != PROBE:
            at = next((i for i, (a, b) in enumerate(zip(decoded, PROBE)) if a != b), min(len(decoded), len(PROBE)))
            raise ConfigError(
                f"tokenizer.path={source} does not give back the text it encodes (from character {at}: "
                f"{PROBE[at : at + 12]!r} came back as {decoded[at : at + 12]!r}), so bits per byte would score "
                "another text: use a byte-level tokenizer (GPT-2's, Llama 3's) or tokenizer=bpe"
            )

    @property
    def is_trained(self) -> bool:
        return self._hf is not None

    @property
    def vocab_size(self) -> int:
        self._require_trained()
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    def config(self) -> dict[str, Any]:
        # No path: what identifies the tokenizer is its vocabulary, which cache keys hash and checkpoints store.
        return {"name": self.name}

    def _train(self, pieces: Iterator[str]) -> None:
        raise ConfigError(
            "tokenizer=pretrained is never trained, it needs tokenizer.path: a tokenizer.json file, a folder "
            "holding one, or a model name in the Hugging Face cache (e.g. tokenizer.path=gpt2)"
        )

    def _encode(self, text: str) -> np.ndarray:
        return encode_in_chunks(self._hf, text)

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def unknown_symbols(self, text: str) -> list[str]:
        self._require_trained()
        if self._unk_id is None:
            return []
        return [c for c in dict.fromkeys(text) if self._unk_id in self._hf.encode(c, add_special_tokens=False).ids]

    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        self._require_trained()
        if self._unk_id is None:
            return 0
        return int(np.count_nonzero((self._encode(text) if ids is None else ids) == self._unk_id))

    def hf_tokenizer(self) -> HFTokenizer:
        self._require_trained()
        return HFTokenizer.from_str(self._hf.to_str())

    def _state(self) -> dict[str, Any]:
        return {"hf": json.loads(self._hf.to_str()), "source": self._source}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._set(HFTokenizer.from_str(json.dumps(state["hf"])), str(state.get("source", "")))

"""Character-level tokenizer: one id per Unicode code point."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from lmlab.tokenizers.base import Tokenizer

UNK_TEXT = "\ufffd"  # what <unk> decodes to: the Unicode replacement character
UNK = "<unk>"  # id 0's name in the HF export: no single character can be mistaken for it


def _code_points(text: str) -> np.ndarray:
    # UTF-32 is one uint32 per character: a vectorised view of the code points.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """Ids 1.. are the sorted distinct characters of the training text; id 0 is `<unk>`.

    `<unk>` lets validation and test text with characters never seen in training still encode
    (generation warns about them via `unknown_symbols`); it decodes to U+FFFD. For text whose
    characters were all seen, decode(encode(text)) == text exactly.
    """

    name = "char"

    def __init__(self) -> None:
        self._chars: list[str] = []
        self._table = np.zeros(0, dtype=np.int32)  # code point -> id, 0 (unk) by default

    def _train(self, pieces: Iterator[str]) -> None:
        seen: set[str] = set()
        for piece in pieces:
            seen.update(piece)
        self._set_chars(sorted(seen))

    def _set_chars(self, chars: list[str]) -> None:
        self._chars = chars
        points = [ord(c) for c in chars]
        self._table = np.zeros(max(points) + 1, dtype=np.int32)
        self._table[points] = np.arange(1, len(chars) + 1, dtype=np.int32)

    @property
    def is_trained(self) -> bool:
        return bool(self._chars)

    @property
    def vocab_size(self) -> int:
        return len(self._chars) + 1

    @property
    def unk_id(self) -> int:
        return 0

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def _encode(self, text: str) -> np.ndarray:
        points = _code_points(text)
        known = points < len(self._table)
        return np.where(known, self._table[np.where(known, points, 0)], 0).astype(np.int32)

    def _decode(self, ids: list[int]) -> str:
        symbols = [UNK_TEXT, *self._chars]
        return "".join([symbols[i] for i in ids])

    def unknown_symbols(self, text: str) -> list[str]:
        self._require_trained()
        known = set(self._chars)
        return [c for c in dict.fromkeys(text) if c not in known]

    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        self._require_trained()
        return int(np.count_nonzero((self._encode(text) if ids is None else ids) == 0))

    def hf_tokenizer(self) -> HFTokenizer:
        """One piece per character, looked up in a word-level vocabulary; id 0 decodes to U+FFFD."""
        self._require_trained()
        vocab = {UNK: 0, **{c: i for i, c in enumerate(self._chars, start=1)}}
        hf = HFTokenizer(WordLevel(vocab=vocab, unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Sequence([decoders.Replace(UNK, UNK_TEXT), decoders.Fuse()])
        return hf

    def _state(self) -> dict[str, Any]:
        return {"chars": self._chars}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._set_chars(list(state["chars"]))

"""Raw UTF-8 bytes as tokens: 256 ids, nothing to learn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from lmlab.tokenizers.base import Tokenizer

BYTES = 256


def byte_stand_ins() -> list[str]:
    """The character HF's byte-level pre-tokenizer writes for each byte (GPT-2's map): printable
    Latin-1 bytes stand for themselves, the others take the code points from 256 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins, extra = [], 0
    for byte in range(BYTES):
        if byte in printable:
            stand_ins.append(chr(byte))
        else:
            stand_ins.append(chr(BYTES + extra))
            extra += 1
    return stand_ins


class ByteTokenizer(Tokenizer):
    """Id i is the byte i of the text's UTF-8 encoding.

    The baseline every tokenizer is measured against: a token is a byte, so bits per token are bits
    per byte, every text round-trips exactly and the vocabulary is the same for every corpus.
    Training is a no-op: the tokenizer arrives trained. Decoding a cut sequence (a generated one
    that ends inside a character) shows the broken character as U+FFFD.
    """

    name = "bytes"

    @property
    def is_trained(self) -> bool:
        return True

    @property
    def vocab_size(self) -> int:
        return BYTES

    @property
    def unk_id(self) -> None:
        return None

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def _train(self, pieces: Iterator[str]) -> None:
        """Nothing to learn: the 256 byte values are the vocabulary of every text."""

    def _encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def unknown_symbols(self, text: str) -> list[str]:
        return []

    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        return 0

    def hf_tokenizer(self) -> HFTokenizer:
        """Byte-level BPE without merges, each byte's printable stand-in holding the byte's id."""
        vocab = {char: byte for byte, char in enumerate(byte_stand_ins())}
        hf = HFTokenizer(BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        return hf

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """Nothing was learnt, so nothing is restored."""

"""Unigram language-model tokenizer (SentencePiece's model), trained with HF `tokenizers`."""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import Unigram
from tokenizers.trainers import Trainer, UnigramTrainer

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import HFBackedTokenizer
from lmlab.tokenizers.bpe import END_OF_TEXT, MIN_VOCAB_SIZE


class UnigramTokenizer(HFBackedTokenizer):
    """Pieces chosen by a unigram language model (Kudo 2018), as SentencePiece's default model does,
    up to `vocab_size` ids.

    SentencePiece keeps a piece for every character it saw and falls back to bytes for the rest;
    here the pieces are built over UTF-8 bytes (the byte-level alphabet of GPT-2), so every byte is
    a piece and nothing is ever unknown: any text, emoji, CJK or control characters included,
    round-trips exactly. The text is first split as byte-level BPE splits it (words with their
    leading space), which keeps training fast and lets a long text be encoded in chunks.
    `<|endoftext|>` is id 0.
    """

    name = "unigram"

    def __init__(self, vocab_size: int = 1024) -> None:
        super().__init__()
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"tokenizer.vocab_size={vocab_size} is smaller than the byte-level alphabet "
                f"({MIN_VOCAB_SIZE}): set tokenizer.vocab_size to {MIN_VOCAB_SIZE} or more"
            )
        self._vocab_size = vocab_size

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self._vocab_size}

    def _new_hf(self) -> HFTokenizer:
        hf = HFTokenizer(Unigram())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return hf

    def _trainer(self) -> Trainer:
        return UnigramTrainer(
            vocab_size=self._vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )

    @property
    def unk_id(self) -> None:
        return None

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def unknown_symbols(self, text: str) -> list[str]:
        return []

    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        return 0

    def special_tokens(self) -> dict[str, str]:
        return {"eos_token": END_OF_TEXT}

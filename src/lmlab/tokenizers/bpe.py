"""Byte-level BPE tokenizer (GPT-2 style), trained with HF `tokenizers`."""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer, Trainer

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import HFBackedTokenizer

END_OF_TEXT = "<|endoftext|>"

# Every byte is a base symbol, plus the special token: the smallest vocabulary that can encode all.
MIN_VOCAB_SIZE = 256 + 1


class BPETokenizer(HFBackedTokenizer):
    """Merges of byte pairs learnt from the training text, up to `vocab_size` ids.

    Working on UTF-8 bytes means nothing is ever unknown (`unk_id` is None) and any text
    round-trips exactly: decode(encode(text)) == text. `<|endoftext|>` is id 0; the trainer may
    stop below `vocab_size` when the text has no more pairs to merge.
    """

    name = "bpe"

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
        hf = HFTokenizer(BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return hf

    def _trainer(self) -> Trainer:
        return BpeTrainer(
            vocab_size=self._vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )

    @property
    def unk_id(self) -> None:
        return None

    def _decode(self, ids: list[int]) -> str:
        # Keep <|endoftext|>: dropping it would break the exact round trip of text containing it.
        return self._hf.decode(ids, skip_special_tokens=False)

    def unknown_symbols(self, text: str) -> list[str]:
        return []

    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        return 0

    def special_tokens(self) -> dict[str, str]:
        return {"eos_token": END_OF_TEXT}

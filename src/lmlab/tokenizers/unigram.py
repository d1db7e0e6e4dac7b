"""Unigram language-model tokenizer (SentencePiece's model), trained with HF `tokenizers`."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import Unigram
from tokenizers.trainers import Trainer, UnigramTrainer

from lmlab.tokenizers.bpe import END_OF_TEXT, BPETokenizer


class UnigramTokenizer(BPETokenizer):
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

    def _new_hf(self) -> HFTokenizer:
        """Byte-level BPE's pre-tokenizer and decoder around a unigram model: only the model differs."""
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

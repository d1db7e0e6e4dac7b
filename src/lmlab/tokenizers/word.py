"""Word-level tokenizer: one id per frequent word; rarer words spelled out in bytes, or `<unk>`.

Open vocabulary (the default) keeps bits per byte honest: every byte of the text is predicted and
paid for, since a word outside the vocabulary becomes its UTF-8 bytes instead of one cheap `<unk>`.
Closed vocabulary (`unk=True`) is for corpora that come with `<unk>` by construction, such as Penn
Treebank; its scores are optimistic on any text with unknown words.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, WordLevel
from tokenizers.trainers import Trainer, WordLevelTrainer

from lmlab.errors import ConfigError
from lmlab.tokenizers.base import HFBackedTokenizer

UNK = "<unk>"
EOS = "<eos>"
N_BYTES = 256  # open vocabulary: ids 0-255 are the bytes, so any text can be spelled out

# Closed vocabulary: a newline is a token so that line structure (verse, dialogue) survives; all
# other whitespace is dropped. "words": a run of \w, or any other non-space character alone;
# "whitespace": any run of non-space characters (text already tokenized, as PTB is).
_CLOSED_PATTERNS = {"words": r"\n|\w+|[^\w\s]", "whitespace": r"\n|\S+"}

# Open vocabulary: the pieces are the matches and the text between them (Split's "isolated"), so
# they concatenate back to the text. A word or mark carries at most one leading space (GPT-2's
# convention: " the" and "the" are two words); a whitespace run leaves its last space to the next
# word; a newline is always a piece alone, which also keeps chunked encoding exact (split_chunks).
_OPEN_PATTERNS = {
    "words": r" ?\w+| ?[^\w\s]|\n|[^\S\n]+(?!\S)",
    "whitespace": r" ?\S+|\n|[^\S\n]+(?!\S)",
}
SPLITS = tuple(_OPEN_PATTERNS)

# Closed-vocabulary decoding puts one space between tokens, except around newlines, before these
# marks and after those. The apostrophe and hyphen bind both ways (o'er, 'tis, well-met, --), so
# 97% of Tiny Shakespeare's lines come back unchanged.
_NO_SPACE_BEFORE = frozenset(".,;:!?')]}-")
_NO_SPACE_AFTER = frozenset("([{'-")

_LEGACY_SPLIT = pre_tokenizers.Split(Regex(_CLOSED_PATTERNS["words"]), behavior="removed", invert=True)


def split_words(text: str) -> list[str]:
    """The tokens a closed-vocabulary `WordTokenizer` (split="words") sees: words, marks and newlines."""
    return [token for token, _ in _LEGACY_SPLIT.pre_tokenize_str(text)]


def join_words(tokens: list[str], glue_marks: bool = True) -> str:
    """Closed-vocabulary tokens back to text: one space between tokens, none around newlines, and
    (with `glue_marks`) none before/after the punctuation marks above."""
    parts: list[str] = []
    previous = "\n"
    for token in tokens:
        glued = glue_marks and (token in _NO_SPACE_BEFORE or previous in _NO_SPACE_AFTER)
        if not (token == "\n" or previous == "\n" or glued):
            parts.append(" ")
        parts.append(token)
        previous = token
    return "".join(parts)


def normalize_spacing(text: str) -> str:
    """`text` as a closed-vocabulary `WordTokenizer` gives it back: same tokens, spacing redone by
    `join_words`. Idempotent, and the identity on text already spaced that way (most plain prose)."""
    return join_words(split_words(text))


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0-255 that HF's ByteLevel pre-tokenizer uses (GPT-2's
    bytes_to_unicode): printable Latin-1 stands for itself, every other byte for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(N_BYTES)]


class WordTokenizer(HFBackedTokenizer):
    """Words (and punctuation marks, and whitespace) that occur at least `min_frequency` times.

    unk=False (open vocabulary, the default): ids 0-255 are bytes, the rest whole pieces of text
    (" the", ",", "\\n"). A piece outside the vocabulary is spelled out byte by byte, so nothing is
    unknown (`unk_id` is None) and decode(encode(text)) == text exactly for any text.
    unk=True (closed vocabulary): pieces outside the vocabulary become `<unk>`, which decodes as the
    text "<unk>"; spacing is not stored, so decoding gives `normalize_spacing(text)` for text with no
    unknown word. `eos_per_line` (closed only) makes each newline the token `<eos>`, as in Penn
    Treebank's standard scoring. `split` says what a word is: "words" (runs of letters/digits,
    every other mark alone) or "whitespace" (runs of non-space characters, for pre-tokenized text).
    `max_vocab_size` counts every id (the 256 bytes or `<unk>` included); None keeps all.
    """

    name = "word"

    def __init__(
        self,
        min_frequency: int = 2,
        max_vocab_size: int | None = None,
        unk: bool = False,
        split: str = "words",
        eos_per_line: bool = False,
    ) -> None:
        super().__init__()
        if min_frequency < 1:
            raise ConfigError(f"tokenizer.min_frequency={min_frequency}: set it to 1 or more")
        smallest = 2 if unk else N_BYTES + 1
        if max_vocab_size is not None and max_vocab_size < smallest:
            what = "<unk>" if unk else f"the {N_BYTES} byte tokens of an open vocabulary"
            raise ConfigError(
                f"tokenizer.max_vocab_size={max_vocab_size} leaves no room for a word beside {what}: "
                f"set it to {smallest} or more, or null for no limit"
            )
        if split not in SPLITS:
            raise ConfigError(f"tokenizer.split={split!r} is not one of {', '.join(SPLITS)}")
        if eos_per_line and not unk:
            raise ConfigError(
                "tokenizer.eos_per_line=true needs a closed vocabulary: set tokenizer.unk=true too "
                "(an open vocabulary already keeps every newline as a token)"
            )
        self.min_frequency = min_frequency
        self.max_vocab_size = max_vocab_size
        self.unk = unk
        self.split = split
        self.eos_per_line = eos_per_line

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "min_frequency": self.min_frequency,
            "max_vocab_size": self.max_vocab_size,
            "unk": self.unk,
            "split": self.split,
            "eos_per_line": self.eos_per_line,
        }

    def _pre_tokenizer(self) -> pre_tokenizers.PreTokenizer:
        if self.unk:
            pattern = (EOS + "|" if self.eos_per_line else "") + _CLOSED_PATTERNS[self.split]
            return pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
        pieces = pre_tokenizers.Split(Regex(_OPEN_PATTERNS[self.split]), behavior="isolated")
        # then each piece's UTF-8 bytes as printable symbols, so that a byte is a vocabulary symbol
        return pre_tokenizers.Sequence([pieces, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def _new_hf(self) -> HFTokenizer:
        """Closed: the final pipeline. Open: the one that counts pieces, before `_open_vocabulary`."""
        hf = HFTokenizer(WordLevel(unk_token=UNK))
        if self.eos_per_line:
            hf.normalizer = normalizers.Replace("\n", f" {EOS} ")
        hf.pre_tokenizer = self._pre_tokenizer()
        return hf

    def _trainer(self) -> Trainer:
        # open vocabulary: count every piece here, cap after the byte symbols are in (_open_vocabulary)
        limit = self.max_vocab_size if self.unk and self.max_vocab_size else sys.maxsize
        return WordLevelTrainer(
            vocab_size=limit,
            min_frequency=self.min_frequency,
            special_tokens=[UNK] if self.unk else [],
            show_progress=False,
        )

    def _train(self, pieces: Iterator[str]) -> None:
        super()._train(pieces)
        if not self.unk:
            self._hf = self._open_vocabulary([w for w, _ in sorted(self._hf.get_vocab().items(), key=lambda kv: kv[1])])

    def _training_chunk(self, chunk: str) -> str:
        # closed: "<unk>" written in the text (PTB) is the special token, not a second word with its own
        # id. It holds no whitespace, so no safe cut falls inside it: replacing it chunk by chunk is exact.
        return chunk.replace(UNK, " ") if self.unk else chunk

    def _open_vocabulary(self, pieces: list[str]) -> HFTokenizer:
        """The 256 byte symbols, then the most frequent `pieces` that fit. A BPE model with no
        merges and `ignore_merges` looks a whole piece up first and otherwise falls back to its
        symbols (bytes): exactly "a known word is one token, any other is spelled out"."""
        symbols = byte_symbols()
        vocab = dict(zip(symbols, range(N_BYTES)))
        room = (self.max_vocab_size or sys.maxsize) - N_BYTES
        for piece in pieces:
            if room == 0:
                break
            if piece not in vocab:
                vocab[piece] = len(vocab)
                room -= 1
        hf = HFTokenizer(BPE(vocab=vocab, merges=[], ignore_merges=True))
        hf.pre_tokenizer = self._pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        return hf

    @property
    def unk_id(self) -> int | None:
        self._require_trained()
        return self._hf.token_to_id(UNK) if self.unk else None

    def _decode(self, ids: list[int]) -> str:
        if not self.unk:
            return self._hf.decode(ids, skip_special_tokens=False)
        tokens = [self._hf.id_to_token(i) for i in ids]
        if self.eos_per_line:
            tokens = ["\n" if token == EOS else token for token in tokens]
        return join_words(tokens, glue_marks=self.split == "words")

    def _pieces(self, text: str) -> list[str]:
        """The pieces the vocabulary is looked up with (closed vocabulary: the words)."""
        normalized = self._hf.normalizer.normalize_str(text) if self._hf.normalizer else text
        return [piece for piece, _ in self._hf.pre_tokenizer.pre_tokenize_str(normalized)]

    def unknown_symbols(self, text: str) -> list[str]:
        self._require_trained()
        if not self.unk:
            return []
        vocab = self._hf.get_vocab()
        return [w for w in dict.fromkeys(self._pieces(text)) if w not in vocab]

    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        self._require_trained()
        if not self.unk:
            return 0
        ids = self._encode(text) if ids is None else ids
        # "<unk>" written in the text is the <unk> token itself (a special token, matched before
        # splitting), so it is known, not lost: PTB's own <unk>s are not counted
        return int(np.count_nonzero(ids == self.unk_id)) - text.count(UNK)

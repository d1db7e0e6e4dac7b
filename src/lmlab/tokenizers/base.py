"""The interface every tokenizer implements, and the plumbing they share.

A tokenizer is trained on the training split only, then turns any text into int32 ids and back.
It is saved as one JSON document (settings + vocabulary), never a pickle, so a checkpoint's
tokenizer can be read by a person and rebuilt exactly by `load_tokenizer`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.trainers import Trainer

from lmlab.errors import ConfigError, DataError
from lmlab.io import atomic_write_text

# Version 2 added the word tokenizer's open vocabulary (settings unk, split, eos_per_line);
# version-1 files still load, their word tokenizers as the closed vocabulary they were.
FORMAT = "lmlab-tokenizer/2"
FORMAT_V1 = "lmlab-tokenizer/1"

# Chunks of ~16 KB let HF's encode_batch spread a large corpus over every core.
CHUNK_CHARS = 1 << 14
# Chunks per encode_batch call: enough to keep every core busy, few enough that HF's Encoding
# objects (~140 bytes a token: token strings, offsets, masks, beside 4 bytes of id) stay few. An
# 8 MB piece of Shakespeare encoded word-level peaked 344 MB above the process in one call, 117 MB
# in calls of 64 chunks; the token cache encodes a few such pieces at once. The calls are
# `encode_batch_fast`, which gives the same ids without computing offsets (nothing here reads them):
# 8 MB of Shakespeare took 26 % less CPU word-level, 16 % less with BPE, 19 % less with unigram.
ENCODE_BATCH = 64

# Where to cut a text so that its pieces encode exactly as the whole does: places where every
# pre-tokenizer used here (byte-level BPE's GPT-2 regex, the word splitters, the closed vocabulary's
# newline <eos>) ends one pre-token and starts the next, and behaves at a string's end as it does in
# the middle. Pieces cut there also count the same pre-tokens, so a tokenizer trains on them exactly
# as on the whole text. Two such places:
# - a newline between two printable ASCII characters ("a\nb");
# - after a newline, before one space and a printable ASCII character ("a \n b": Penn Treebank and
#   WikiText lines start and end with a space). The whitespace run before that space ends at the
#   newline, whole or cut, and the space goes with the word after it.
# Not safe: "a \nb" is "a", " ", "\n", "b" whole but "a \n" alone ends in the single pre-token
# " \n"; "\n  b" is "\n ", " b" whole but "\n" | " ", " b" cut after the newline.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])|(?<=\n)(?= [!-~])")


def split_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut `text` into pieces of about `size` characters at safe places (see `_SAFE_CUT`).

    The pieces concatenate back to `text` (an empty text gives one empty piece); a text with no
    safe place stays whole.
    """
    start = 0
    while len(text) - start > size and (cut := _SAFE_CUT.search(text, start + size)):
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def safe_pieces(texts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """The concatenation of `texts`, cut anew into pieces of about `size` characters at safe places.

    Where `texts` were cut does not matter (mid-word, mid-line): the pieces encode, and train a
    tokenizer, exactly as their concatenation does, while memory holds about one text and one
    piece. A stretch with no safe place stays in one piece, retried only once it has doubled so
    that the work stays linear. No text (or only empty ones) gives no piece.
    """
    buffer, retry_at = "", size
    for text in texts:
        buffer += text
        if len(buffer) < retry_at:
            continue
        chunks = split_chunks(buffer, size)
        buffer = next(chunks)
        for chunk in chunks:  # one chunk ahead: the last one may still grow
            yield buffer
            buffer = chunk
        retry_at = size if len(buffer) < size else 2 * len(buffer)
    if buffer:
        yield buffer


def encode_in_chunks(hf: HFTokenizer, text: str) -> np.ndarray:
    """The ids of `text` under `hf`, its safely cut chunks encoded on all cores (Rust threads; no GIL,
    no processes)."""
    chunks, ids = list(split_chunks(text)), []
    encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # the same ids; older tokenizers lack it
    for start in range(0, len(chunks), ENCODE_BATCH):
        encodings = encode_batch(chunks[start : start + ENCODE_BATCH], add_special_tokens=False)
        ids += [np.asarray(e.ids, dtype=np.int32) for e in encodings]
    return np.concatenate(ids)


def read_document(text: str, source: str) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(format, name, settings, state) of a saved tokenizer's JSON text, or a one-line ConfigError.

    Only ever parses `text`: a string from a checkpoint is never taken for a path, so a damaged
    checkpoint cannot make lmlab open a FIFO or /dev/zero.
    """
    try:
        document = json.loads(text)
    except ValueError:
        raise ConfigError(f"{source} is not an lmlab tokenizer: it is not JSON") from None
    if not isinstance(document, dict) or document.get("format") not in (FORMAT, FORMAT_V1):
        raise ConfigError(f"{source} is not an lmlab tokenizer (expected format {FORMAT!r})")
    settings, state = document.get("config"), document.get("state")
    if not (isinstance(settings, dict) and isinstance(settings.get("name"), str) and isinstance(state, dict)):
        raise ConfigError(f"{source} is a damaged lmlab tokenizer: its 'config' (with a 'name') or 'state' is missing")
    settings = dict(settings)
    return document["format"], settings.pop("name"), settings, state


class Tokenizer(ABC):
    """Text <-> int32 ids, learnt from the training split."""

    name: str

    def train(self, text: str) -> None:
        """Learn the vocabulary from `text`, which must be the training split only."""
        self.train_from_iterator([text])

    def train_from_iterator(self, pieces: Iterable[str]) -> None:
        """Learn exactly what `train("".join(pieces))` learns, holding a few pieces at a time rather
        than their concatenation: how a training split larger than memory trains its tokenizer.
        The pieces may be cut anywhere, even inside a word."""
        stream = iter(pieces)
        first = next((piece for piece in stream if piece), None)
        if first is None:
            raise DataError(f"cannot train the {self.name} tokenizer on an empty text")
        self._train(chain([first], stream))

    def encode(self, text: str) -> np.ndarray:
        """The ids of `text` as an int32 array; symbols the vocabulary lacks become `unk_id`, if any."""
        self._require_trained()
        return self._encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids` (a list, an array or a CPU tensor)."""
        self._require_trained()
        return self._decode(np.asarray(ids, dtype=np.int64).ravel().tolist())

    def to_json(self) -> str:
        """The whole trained tokenizer (settings + vocabulary) as one JSON string."""
        self._require_trained()
        return json.dumps({"format": FORMAT, "config": self.config(), "state": self._state()})

    def save(self, path: str | Path) -> None:
        """Write `to_json()` to `path` atomically, so a crash never leaves half a file."""
        atomic_write_text(path, self.to_json())

    def _require_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError(
                f"the {self.name} tokenizer has no vocabulary yet: "
                "call train(text) or build it with load_tokenizer(path)"
            )

    @property
    @abstractmethod
    def is_trained(self) -> bool:
        """Whether a vocabulary has been learnt or loaded."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of ids, special tokens included."""

    @property
    @abstractmethod
    def unk_id(self) -> int | None:
        """The id of anything the vocabulary lacks; None when nothing can be unknown."""

    @property
    def emits_unk(self) -> bool:
        """Whether some text can encode to `<unk>`: such runs skip the cost of the unknown bytes, so
        their scores are optimistic wherever the `<unk>` rate is not zero."""
        return self.unk_id is not None

    def special_tokens(self) -> dict[str, str]:
        """transformers' names for this vocabulary's special tokens (e.g. eos_token), for export."""
        return {}

    @abstractmethod
    def hf_tokenizer(self) -> HFTokenizer:
        """A HF `tokenizers.Tokenizer` giving the same ids and decoding: what transformers loads."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The constructor settings plus "name": what cache keys and checkpoints record."""

    @abstractmethod
    def unknown_symbols(self, text: str) -> list[str]:
        """The distinct characters or words of `text` that the vocabulary lacks, in order."""

    @abstractmethod
    def count_unknown(self, text: str, ids: np.ndarray | None = None) -> int:
        """How many tokens of `text` become `<unk>` because the vocabulary lacks them (`<unk>`
        written in the text itself, as Penn Treebank has it, is not counted). `ids` is
        `encode(text)` when the caller has it already, so the text is not encoded twice."""

    @abstractmethod
    def _train(self, pieces: Iterator[str]) -> None:
        """Learn the vocabulary from the concatenation of `pieces` (at least one, not empty)."""

    @abstractmethod
    def _encode(self, text: str) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The learnt vocabulary, as JSON-ready data."""

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore what `_state` returned."""


class HFBackedTokenizer(Tokenizer):
    """A tokenizer whose vocabulary and encoding live in a HF `tokenizers.Tokenizer`.

    Subclasses say how to build the empty HF pipeline and its trainer; this class trains it,
    encodes in parallel, and saves it as the HF tokenizer's own JSON (loading is exact).
    """

    def __init__(self) -> None:
        self._hf: HFTokenizer | None = None

    @abstractmethod
    def _new_hf(self) -> HFTokenizer:
        """The untrained HF pipeline: model, pre-tokenizer, decoder."""

    @abstractmethod
    def _trainer(self) -> Trainer: ...

    def _train(self, pieces: Iterator[str]) -> None:
        # The trainer counts the pre-tokens of each chunk; cut only at safe places, the chunks hold
        # exactly the pre-tokens of the whole text, so the vocabulary is the whole text's.
        hf = self._new_hf()
        chunks = map(self._training_chunk, safe_pieces(pieces, CHUNK_CHARS))
        hf.train_from_iterator(chunks, trainer=self._trainer())
        self._hf = hf

    def _training_chunk(self, chunk: str) -> str:
        """The text the trainer counts for one safely cut chunk: the chunk itself, unless a subclass
        must hide something from the trainer (a change that no safe cut can split)."""
        return chunk

    @property
    def is_trained(self) -> bool:
        return self._hf is not None

    @property
    def vocab_size(self) -> int:
        self._require_trained()
        return self._hf.get_vocab_size()

    def _encode(self, text: str) -> np.ndarray:
        return encode_in_chunks(self._hf, text)

    def hf_tokenizer(self) -> HFTokenizer:
        self._require_trained()
        return HFTokenizer.from_str(self._hf.to_str())

    def _state(self) -> dict[str, Any]:
        return {"hf": json.loads(self._hf.to_str())}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._hf = HFTokenizer.from_str(json.dumps(state["hf"]))

"""The test split's score per block of its raw text: the unit a paired bootstrap resamples.

Runs with different tokenizers cut the test text into different tokens and windows, so windows
cannot be paired between them. Blocks of text can: the test text is cut at the places where
`lmlab.tokenizers.base.split_chunks` cuts (a newline between printable characters, every
`block_chars` characters or so), which is where every tokenizer encodes the pieces exactly as it
encodes the whole. Each block's nats are the sum over the tokens that encode it, so all runs scored
on one text share one block layout, and each block's bytes are paid for in full by every run. A
text with few safe newlines gives few blocks, and the bootstrap then says it cannot pair the runs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.io import atomic_open

log = logging.getLogger(__name__)

BLOCKS_FILE = "test_blocks.npz"
MIN_BLOCK_CHARS = 512  # short enough for ~100 blocks of Tiny Shakespeare's 55 kB test split
MAX_BLOCKS = 4000  # larger test splits get longer blocks: encoding stays fast, resampling small


@dataclass(frozen=True)
class TestBlocks:
    """One run's test score per block: nats, bytes and tokens, and the hash of the text they cover."""

    nats: np.ndarray
    bytes: np.ndarray
    tokens: np.ndarray
    text_sha256: str

    __test__ = False  # not a pytest test class, whatever its name

    @property
    def bpb(self) -> float:
        return float(self.nats.sum() / np.log(2) / self.bytes.sum())


def block_chars(test_bytes: int) -> int:
    """The block length (characters) for a test split of `test_bytes`: fixed by the text alone."""
    return max(MIN_BLOCK_CHARS, test_bytes // MAX_BLOCKS)


def score_blocks(token_nats: np.ndarray, pieces, tokenizer) -> TestBlocks | None:
    """Sum `token_nats` (the test split's tokens, in order) over the tokens of each text piece.

    None if the pieces' tokens do not add up to the scored tokens (a tokenizer that encodes pieces
    differently from the whole): the bootstrap then leaves the run out rather than misalign it.
    """
    digest, counts, sizes = hashlib.sha256(), [], []
    for piece in pieces:
        raw = piece.encode("utf-8")
        digest.update(raw)
        counts.append(len(tokenizer.encode(piece)))
        sizes.append(len(raw))
    tokens = np.asarray(counts, dtype=np.int64)
    if tokens.sum() != len(token_nats):
        log.warning(
            f"no {BLOCKS_FILE}: the test text's blocks encode to {int(tokens.sum()):,} tokens "
            f"but {len(token_nats):,} were scored"
        )
        return None
    ends = np.cumsum(tokens)
    nats = np.add.reduceat(token_nats, ends - tokens) if len(token_nats) else np.zeros(len(tokens))
    nats[tokens == 0] = 0.0  # reduceat returns the next element for an empty block
    return TestBlocks(nats.astype(np.float64), np.asarray(sizes, dtype=np.int64), tokens, digest.hexdigest())


def write_test_blocks(path: Path, token_nats: np.ndarray, datamodule) -> TestBlocks | None:
    """Score the test text's blocks and write them to `path` (atomically); None if nothing was written."""
    from lmlab.data.prepare import text_pieces  # the data layer, only needed when a run writes its blocks

    corpus = datamodule.corpus
    if len(token_nats) != corpus.split_tokens["test"]:
        log.info(f"no {BLOCKS_FILE}: the test pass scored part of the split (limit_test_batches)")
        return None
    try:  # the test text is read and encoded once more, in blocks
        text, start, end = datamodule.corpus_source().ranges()["test"]
        size = block_chars(end - start)
        blocks = score_blocks(token_nats, text_pieces(text, start, end, size), datamodule.tokenizer)
    except (LmlabError, OSError) as err:  # the blocks are an extra: the run's scores stand without them
        log.warning(f"no {BLOCKS_FILE}: the test text could not be read again ({err})")
        return None
    if blocks is not None:
        with atomic_open(path) as f:
            np.savez(
                f,
                nats=blocks.nats,
                bytes=blocks.bytes,
                tokens=blocks.tokens,
                text_sha256=np.asarray(blocks.text_sha256),
                block_chars=np.asarray(size),
            )
    return blocks


def load_test_blocks(run_dir: Path) -> TestBlocks | None:
    """A run's blocks, or None if it has none (an older run, a partial test pass, a crash)."""
    try:
        with np.load(run_dir / BLOCKS_FILE) as data:
            return TestBlocks(data["nats"], data["bytes"], data["tokens"], str(data["text_sha256"]))
    except (OSError, KeyError, ValueError):
        return None

"""Is the difference real? A paired bootstrap of the test bits-per-byte difference of two runs.

Both runs' test scores are sums over the same blocks of the same test text (lmlab.report.blocks).
Resampling blocks with replacement, the same blocks for both runs, and recomputing

    difference = (sum of B's nats - sum of A's nats) / ln 2 / (sum of the blocks' bytes)

gives the spread of the difference over texts like this one; the 2.5th and 97.5th percentiles make
the 95% interval. Pairing cancels what the blocks share (a hard passage is hard for both runs),
which is why it separates runs a plain per-run interval cannot. Blocks of several hundred
characters keep most of the dependence between neighbouring tokens inside a block. It measures
how much the verdict depends on the test text, not on the seed: seed repeats stay mean ± std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmlab.errors import ConfigError
from lmlab.report.blocks import TestBlocks

RESAMPLES = 2000
LEVEL = 0.95
MIN_BLOCKS = 20  # fewer blocks make percentile intervals meaningless
CHUNK = 500  # resamples drawn at a time, so memory stays small for thousands of blocks


@dataclass(frozen=True)
class Interval:
    """B's test bits per byte minus A's, and its bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return not self.low <= 0.0 <= self.high


def check_paired(a: TestBlocks, b: TestBlocks, names: tuple[str, str] = ("A", "B")) -> None:
    """Refuse, in one line, to pair runs scored on different test text or with too few blocks."""
    if a.text_sha256 != b.text_sha256 or not np.array_equal(a.bytes, b.bytes):
        raise ConfigError(
            f"cannot pair {names[0]} and {names[1]}: they were scored on different test text (hashes "
            f"{a.text_sha256[:12]} and {b.text_sha256[:12]}); bootstrap only runs of the same data and data.splits"
        )
    if len(a.bytes) < MIN_BLOCKS:
        raise ConfigError(
            f"cannot bootstrap {names[0]} against {names[1]}: the test text has {len(a.bytes)} blocks "
            f"(at least {MIN_BLOCKS} needed); give the test split more text (data.splits) or more line breaks"
        )


def paired_bootstrap(
    a: TestBlocks,
    b: TestBlocks,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> Interval:
    """The `level` percentile interval of B's test bpb minus A's, from `resamples` paired block resamples."""
    check_paired(a, b, names)
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ConfigError(f"a bootstrap needs resamples >= 1 and 0 < level < 1 (got {resamples}, {level})")
    delta = np.asarray(b.nats, dtype=np.float64) - np.asarray(a.nats, dtype=np.float64)
    size = np.asarray(a.bytes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, resamples, CHUNK):
        picks = rng.integers(0, len(delta), size=(min(CHUNK, resamples - start), len(delta)))
        stats.append(delta[picks].sum(axis=1) / size[picks].sum(axis=1) / math.log(2))
    low, high = np.quantile(np.concatenate(stats), [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(delta.sum() / size.sum() / math.log(2)), float(low), float(high))


def mean_blocks(blocks: list[TestBlocks]) -> TestBlocks:
    """The blocks of several seeds of one configuration, averaged (all on one text: checked)."""
    for other in blocks[1:]:
        check_paired(blocks[0], other, ("one seed", "another"))
    nats = np.mean([b.nats for b in blocks], axis=0)
    return TestBlocks(nats, blocks[0].bytes, blocks[0].tokens, blocks[0].text_sha256)

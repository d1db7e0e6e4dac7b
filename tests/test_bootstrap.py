"""Paired bootstrap of the test-bpb difference: per-block test nats, their pairing, and the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmlab.callbacks import in_text_order
from lmlab.data.windows import IGNORE_INDEX, EvalWindows, StreamBatches
from lmlab.errors import ConfigError
from lmlab.report.blocks import TestBlocks, load_test_blocks, score_blocks
from lmlab.report.bootstrap import MIN_BLOCKS, mean_blocks, paired_bootstrap
from lmlab.tokenizers import CharTokenizer


def blocks(nats, size=500, sha="text-a") -> TestBlocks:
    nats = np.asarray(nats, dtype=np.float64)
    return TestBlocks(nats, np.full(len(nats), size), np.full(len(nats), size), sha)


def noisy(seed: int, n: int = 200, mean: float = 1000.0) -> np.ndarray:
    """Per-block nats of a run: a shared difficulty per block (the text) plus the run's own noise."""
    text = np.random.default_rng(0).gamma(4.0, mean / 4.0, n)
    return text + np.random.default_rng(seed).normal(0.0, 20.0, n)


def test_two_identical_runs_differ_by_nothing_significant():
    a = blocks(noisy(1))
    interval = paired_bootstrap(a, blocks(a.nats.copy()))
    assert interval.difference == 0.0 and interval.low <= 0.0 <= interval.high and not interval.significant


def test_runs_differing_only_by_noise_are_not_significant():
    interval = paired_bootstrap(blocks(noisy(1)), blocks(noisy(2)))
    assert interval.low < 0.0 < interval.high and not interval.significant


def test_a_clearly_better_run_is_significant_and_the_interval_holds_the_true_difference():
    a, b = blocks(noisy(1)), blocks(noisy(2) * 1.02)  # B pays 2% more nats on every block
    interval = paired_bootstrap(a, b, resamples=4000, seed=3)
    assert interval.significant and 0.0 < interval.low < interval.difference < interval.high
    assert interval.difference == pytest.approx((b.bpb - a.bpb), rel=1e-12)
    # pairing is the point: one run's own bpb varies over resampled texts far more than the 2% difference
    alone = paired_bootstrap(blocks(np.zeros(len(a.nats))), a, resamples=4000, seed=3)
    assert alone.high - alone.low > 5 * (interval.high - interval.low)
    assert alone.high - alone.low > b.bpb - a.bpb


def test_the_bootstrap_is_seeded():
    a, b = blocks(noisy(1)), blocks(noisy(2))
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)


def test_runs_scored_on_different_text_are_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        paired_bootstrap(blocks(noisy(1), sha="text-a"), blocks(noisy(1), sha="text-b"))
    assert "\n" not in str(err.value) and "scored on different test text" in str(err.value)
    with pytest.raises(ConfigError, match="different test text"):  # same hash, other block layout
        paired_bootstrap(blocks(noisy(1), size=500), blocks(noisy(1), size=501))


def test_too_few_blocks_are_refused():
    with pytest.raises(ConfigError, match=f"at least {MIN_BLOCKS} needed"):
        paired_bootstrap(blocks(noisy(1, n=MIN_BLOCKS - 1)), blocks(noisy(2, n=MIN_BLOCKS - 1)))


def test_seeds_of_one_configuration_average_block_by_block():
    mean = mean_blocks([blocks([1.0] * 30), blocks([3.0] * 30)])
    assert np.allclose(mean.nats, 2.0)
    with pytest.raises(ConfigError):
        mean_blocks([blocks([1.0] * 30), blocks([1.0] * 30, sha="other")])


def test_blocks_sum_the_nats_of_the_tokens_that_encode_them():
    tokenizer = CharTokenizer()
    tokenizer.train("abcdé\n")
    pieces = ["ab\n", "", "cdé\n"]
    token_nats = np.arange(1.0, 8.0)  # 7 characters
    scored = score_blocks(token_nats, pieces, tokenizer)
    assert scored.nats.tolist() == [1 + 2 + 3, 0.0, 4 + 5 + 6 + 7]
    assert scored.bytes.tolist() == [3, 0, 5] and scored.tokens.tolist() == [3, 0, 4]
    assert scored.bpb == pytest.approx(28 / math.log(2) / 8)
    assert score_blocks(token_nats[:-1], pieces, tokenizer) is None  # misaligned: no blocks rather than wrong ones


@pytest.mark.parametrize("stateful", [False, True])
def test_per_token_nats_come_back_in_text_order(stateful):
    """Each target's value, as the test pass keeps it batch by batch, flattens to the split's token order."""
    ids = np.arange(1, 300)  # token i's "nats" is its id
    if stateful:
        dataset = StreamBatches(ids, batch_size=4, block_size=8, context_token=0)
        batches = [dataset[k][1] for k in range(len(dataset))]
    else:
        dataset = EvalWindows(ids, block_size=8, context_token=0)
        batches = [
            torch.stack([dataset[i][1] for i in range(k, min(k + 5, len(dataset)))]) for k in range(0, len(dataset), 5)
        ]
    chunks = [torch.where(y == IGNORE_INDEX, -1, y).float() for y in batches]
    values = in_text_order(chunks, stateful)
    assert values[values >= 0].long().tolist() == ids.tolist()


def test_a_run_without_blocks_has_none(tmp_path):
    assert load_test_blocks(tmp_path) is None

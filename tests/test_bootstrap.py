"""Paired bootstrap of the test-bpb difference: per-block test nats, their pairing, and the interval."""

from __future__ import annotations

import math
import os
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmlab.callbacks import SaveTestBlocks, in_text_order
from lmlab.data import TextDataModule
from lmlab.data.windows import IGNORE_INDEX, EvalWindows, StreamBatches
from lmlab.errors import ConfigError
from lmlab.models import GPT, RecurrentLM
from lmlab.report.blocks import BLOCKS_FILE, TestBlocks, load_test_blocks, score_blocks
from lmlab.report.bootstrap import MIN_BLOCKS, mean_blocks, paired_bootstrap
from lmlab.task import LanguageModelTask
from lmlab.tokenizers import CharTokenizer
from tests.helpers import REPO, cpu_trainer


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


def _test_blocks(devices: int, corpus: Path, out: Path) -> None:
    """Test a seeded GPT (windows) and a seeded LSTM (stateful streams) on `devices` processes, writing their blocks."""
    for name, stateful in (("gpt", False), ("lstm", True)):
        data = TextDataModule(
            CharTokenizer(),
            str(corpus),
            cache_dir=str(corpus.parent / "cache"),
            block_size=29,
            batch_size=3,
            eval_batch_size=4,
            splits=(0.8, 0.1, 0.1),
            stateful=stateful,
        )
        data.prepare_data()
        torch.manual_seed(0)
        vocab = data.tokenizer.vocab_size
        if stateful:
            model = RecurrentLM(vocab, cell="lstm", d_model=16, n_layer=1, dropout=0.0)
        else:
            model = GPT(vocab, d_model=16, n_layer=1, n_head=2, block_size=29)
        task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-3), stateful=stateful)
        trainer = cpu_trainer(devices, [SaveTestBlocks(str(out / name / BLOCKS_FILE))])
        trainer.test(task, datamodule=data, verbose=False)
        if trainer.is_global_zero:
            (out / name / "test_bpb").write_text(str(float(trainer.callback_metrics["test/bpb"])))


def _rank_main(rank: int, port: int, corpus: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    try:
        _test_blocks(2, corpus, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_the_blocks_one_process_writes(tmp_path):
    """Windows and stateful streams sharded over 2 DDP ranks (gloo) gather back into the same blocks."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:120_000])  # 23 blocks of test text
    one, two = tmp_path / "one", tmp_path / "two"
    _test_blocks(1, corpus, one)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, corpus, two), nprocs=2, join=True)
    for name in ("gpt", "lstm"):
        single, ddp = load_test_blocks(one / name), load_test_blocks(two / name)
        assert len(single.nats) >= MIN_BLOCKS and single.text_sha256 == ddp.text_sha256
        assert np.array_equal(single.tokens, ddp.tokens)
        assert np.allclose(single.nats, ddp.nats, rtol=1e-5)  # every block got its own tokens' nats
        assert single.bpb == pytest.approx(float((one / name / "test_bpb").read_text()), rel=1e-5)
        assert ddp.bpb == pytest.approx(float((two / name / "test_bpb").read_text()), rel=1e-5)

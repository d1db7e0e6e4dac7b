"""How training windows are cut, sampled and sharded: shifted grids, random starts, exact resume, per-rank shares.

The corpora here are `np.arange`, so every id is its own position in the split and a window says
exactly which tokens it covers.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmlab.data import TextDataModule, sampling
from lmlab.data.cache import TokenizedCorpus
from lmlab.data.sampling import EpochSampler, KeyedPermutation, WindowSampler, windows_per_epoch
from lmlab.data.windows import IGNORE_INDEX, EvalWindows, TrainWindows
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import CharTokenizer

SPLIT_TOKENS = {"train": 1000, "val": 123, "test": 77}


def datamodule(rank: int = 0, world_size: int = 1, distributed_sampler: bool = False, **kwargs) -> TextDataModule:
    """A data module over a stub corpus whose ids are positions, seen from one rank of `world_size`."""
    kwargs = {"block_size": 16, "batch_size": 4, "seed": 3, **kwargs}
    module = TextDataModule(CharTokenizer(), "unused.txt", **kwargs)
    offsets = {"train": 0, "val": 10_000, "test": 20_000}
    ids = {split: np.arange(n, dtype=np.int64) + offsets[split] for split, n in SPLIT_TOKENS.items()}
    module.corpus = TokenizedCorpus(
        tokenizer=module.tokenizer,
        ids=ids,
        split_bytes=dict(SPLIT_TOKENS),
        unk_tokens=dict.fromkeys(SPLIT_TOKENS, 0),
        corpus_sha256="",
        path=Path("unused"),
    )
    if world_size > 1:
        connector = SimpleNamespace(use_distributed_sampler=distributed_sampler)
        module.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, _accelerator_connector=connector)
    return module


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_epoch_mode_shifts_the_grid_each_epoch_yet_sees_each_token_at_most_once():
    loader = datamodule(sampling="epoch").train_dataloader()
    block, n = 16, SPLIT_TOKENS["train"]
    offsets = set()
    for epoch in range(6):
        batches = epoch_batches(loader, epoch)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
        starts = x[:, 0]
        assert len(set((starts % block).tolist())) == 1  # one grid per epoch...
        offsets.add(int(starts[0] % block))
        inputs, targets = np.bincount(x.flatten(), minlength=n), np.bincount(y.flatten(), minlength=n)
        assert inputs.max() == 1 and targets.max() == 1  # ...of non-overlapping windows
        assert len(x) == windows_per_epoch(n, block) // 4 * 4 == (n - block) // block // 4 * 4
    assert len(offsets) > 1  # the grid moves between epochs


def test_random_mode_is_fixed_by_the_seed_and_differs_between_epochs():
    def starts(seed: int, epoch: int) -> list[int]:
        loader = datamodule(sampling="random", seed=seed).train_dataloader()
        return torch.cat([x[:, 0] for x, _ in epoch_batches(loader, epoch)]).tolist()

    first = starts(3, 0)
    assert first == starts(3, 0)
    assert first != starts(4, 0) and first != starts(3, 1)
    assert len(first) == windows_per_epoch(1000, 16) // 4 * 4
    assert len({s % 16 for s in first}) > 1  # not a grid: any start is possible
    assert min(first) >= 0 and max(first) + 16 < 1000  # every target inside the split


@pytest.mark.parametrize("sampling", ["epoch", "random"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_run_resumed_mid_epoch_sees_the_batches_the_interrupted_run_had_not_reached(sampling, world_size):
    for rank in range(world_size):
        straight = datamodule(rank, world_size, sampling=sampling).train_dataloader()
        whole = [x for x, _ in epoch_batches(straight, 1)]
        interrupted = datamodule(rank, world_size, sampling=sampling).train_dataloader()
        interrupted.sampler.set_epoch(1)
        for index, _ in enumerate(interrupted):
            if index == 4:
                state = interrupted.state_dict()
                break
        assert state == {"epoch": 1, "batches": 5}
        resumed = datamodule(rank, world_size, sampling=sampling).train_dataloader()
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(1)  # what Lightning does before iterating the restored epoch
        rest = [x for x, _ in resumed]
        assert len(rest) == len(whole) - 5 and all(torch.equal(a, b) for a, b in zip(rest, whole[5:], strict=True))
        after = [x for x, _ in epoch_batches(resumed, 2)]  # and the next epoch starts from its beginning
        assert all(torch.equal(a, b) for a, b in zip(after, [x for x, _ in epoch_batches(straight, 2)], strict=True))


@pytest.mark.parametrize("sampling", ["epoch", "random"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_take_the_steps_of_one_process_with_world_size_times_the_batch(sampling, world_size):
    single = datamodule(sampling=sampling, batch_size=4 * world_size).train_dataloader()
    ranks = [datamodule(r, world_size, sampling=sampling).train_dataloader() for r in range(world_size)]
    for epoch in (0, 1):
        one = epoch_batches(single, epoch)
        shares = [epoch_batches(loader, epoch) for loader in ranks]
        assert all(len(share) == len(one) for share in shares)  # every rank runs the same number of steps
        for step, (x, _) in enumerate(one):
            together = torch.cat([share[step][0] for share in shares])
            assert sorted(together[:, 0].tolist()) == sorted(x[:, 0].tolist())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_evaluation_shards_score_every_token_exactly_once_on_any_number_of_ranks(world_size):
    ids = np.arange(1, 1 + 7 * 61 + 5)  # an odd number of windows, the last one partial
    shares = [EvalWindows(ids, 61, context_token=0, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1  # padded to equal lengths: no rank waits for another
    batches = [share.__getitems__(list(range(len(share)))) for share in shares]
    targets = torch.cat([y.flatten() for _, y in batches])
    assert targets[targets != IGNORE_INDEX].tolist() == ids.tolist()
    inputs = torch.cat([x.flatten() for x, _ in batches])[: len(ids)]
    assert inputs.tolist() == [0, *ids[:-1].tolist()]  # each token predicted from the one before it


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_rank_reads_its_own_contiguous_streams_of_the_one_process_layout(world_size):
    single = datamodule(stateful=True, batch_size=2 * world_size).train_dataloader()
    one = list(single)
    shares = [
        list(datamodule(r, world_size, stateful=True, batch_size=2).train_dataloader()) for r in range(world_size)
    ]
    for share in shares:
        assert len(share) == len(one) > 1
        for (x0, y0), (x1, _) in zip(share, share[1:], strict=False):
            assert torch.equal(x1[:, 0], y0[:, -1]) and torch.equal(x1[:, 0], x0[:, -1] + 1)  # row i continues
    for step, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([share[step][0] for share in shares]), x)
        assert torch.equal(torch.cat([share[step][1] for share in shares]), y)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_stateful_evaluation_splits_the_same_streams_whatever_the_number_of_ranks(world_size):
    one = list(datamodule(stateful=True, eval_batch_size=5).val_dataloader())
    shares = [
        list(datamodule(r, world_size, stateful=True, eval_batch_size=5).val_dataloader()) for r in range(world_size)
    ]
    for step, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([share[step][1] for share in shares]), y)
        assert torch.equal(torch.cat([share[step][0] for share in shares]), x)
    targets = torch.cat([y.flatten() for _, y in one])
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == list(range(10_000, 10_123))


def test_train_windows_are_addressed_by_their_first_token():
    data = TrainWindows(np.arange(100, dtype=np.uint16), block_size=8)
    assert len(data) == 92  # starts 0..91: the last target is token 99
    x, y = data.__getitems__([0, 24])
    assert torch.equal(x[1], torch.arange(24, 32)) and torch.equal(y[1], torch.arange(25, 33))


def test_a_tiny_split_still_gives_one_window_per_epoch_at_a_safe_offset():
    sampler = WindowSampler(20, 16, mode="epoch", seed=0)
    for epoch in range(10):
        sampler.set_epoch(epoch)
        (start,) = sampler.order()
        assert 0 <= start <= 20 - 17  # the window and its shifted target fit


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: datamodule(sampling="shuffled"), ConfigError, "set data.sampling to 'epoch' or 'random'"),
        (lambda: datamodule(sampling="random", stateful=True), ConfigError, "set data.sampling=epoch"),
        (
            lambda: datamodule(0, 2, distributed_sampler=True).val_dataloader(),
            ConfigError,
            "trainer.use_distributed_sampler=false",
        ),
        (
            lambda: datamodule(0, 4, stateful=True, eval_batch_size=3).val_dataloader(),
            ConfigError,
            "set data.eval_batch_size to 4 or more",
        ),
        (
            lambda: datamodule(0, 8, stateful=True, batch_size=8).train_dataloader(),
            DataError,
            "too few for 64 streams .* or use fewer processes",
        ),
        (lambda: datamodule(0, 8, batch_size=8).train_dataloader(), DataError, "on each of 8 processes"),
    ],
)
def test_a_data_layout_that_cannot_work_ends_in_one_line_naming_the_fix(build, error, message):
    with pytest.raises(error, match=message) as caught:
        build()
    assert "\n" not in str(caught.value)


def test_small_epochs_keep_the_exact_numpy_order_runs_were_published_with():
    """Seeds reproduce earlier results: below EXACT_ORDER_MAX the order is numpy's, drawn as before."""
    sampler = WindowSampler(10_000, 16, mode="epoch", seed=3, rank=1, world_size=2)
    sampler.set_epoch(4)
    rng = np.random.default_rng([3, 4])
    offset = rng.integers(16)
    starts = offset + 16 * rng.permutation(windows_per_epoch(10_000, 16))
    assert np.array_equal(sampler.order(), starts[: 2 * len(sampler)][1::2])
    plain = EpochSampler(50, shuffle=True, seed=9)
    assert np.array_equal(plain.order(), np.random.default_rng([9, 0]).permutation(50))


@pytest.mark.parametrize("n", [1, 2, 3, 100, 1000, 4097])
def test_keyed_permutation_is_a_shuffle_of_every_index(n):
    order = KeyedPermutation(n, key=7)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    if n >= 100:
        assert not np.array_equal(order, np.arange(n))  # shuffled
        assert not np.array_equal(order, KeyedPermutation(n, key=8)(np.arange(n)))  # keyed


@pytest.mark.parametrize("mode", ["epoch", "random"])
def test_large_epochs_are_computed_lazily_with_the_same_guarantees(monkeypatch, mode):
    monkeypatch.setattr(sampling, "EXACT_ORDER_MAX", 50)  # every epoch below counts as large
    monkeypatch.setattr(sampling, "CHUNK", 7)
    n_tokens, block = 2_000, 8
    shares = []
    for rank in range(2):
        sampler = WindowSampler(n_tokens, block, mode=mode, seed=1, rank=rank, world_size=2)
        sampler.set_epoch(2)
        shares.append(list(sampler))
        assert shares[-1] == sampler.order().tolist()  # iteration, chunk by chunk, is the order
        assert all(0 <= s <= n_tokens - block - 1 for s in shares[-1])  # window and target fit
        sampler.resume_at(2, 5)
        assert list(sampler) == shares[-1][5:]
    if mode == "epoch":  # one grid, each window once over both ranks
        starts = shares[0] + shares[1]
        assert len(set(starts)) == len(starts) == 2 * (windows_per_epoch(n_tokens, block) // 2)
        assert len({s % block for s in starts}) == 1
    sampler.set_epoch(3)
    assert sampler.order().tolist() != shares[1]  # a new order each epoch


def test_an_epoch_too_large_to_hold_still_starts_at_once():
    """2^40 windows: a materialised order would need 8 TB; the lazy one yields its first index now."""
    sampler = EpochSampler(2**40, shuffle=True, seed=0)
    first = next(iter(sampler))
    assert 0 <= first < 2**40

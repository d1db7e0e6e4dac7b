"""Turning a stream of token ids into (input, target) batches, for one process or one rank of many.

Three shapes cover every use:
- `TrainWindows`: the training stream's windows, addressed by the position of their first token;
  a sampler (`lmlab.data.sampling`) decides which start positions an epoch visits.
- `EvalWindows`: a full, deterministic pass over a validation/test split in which every token of the
  split is a target exactly once (the last window is padded with `IGNORE_INDEX`). Under DDP each rank
  takes a contiguous share of the windows, padded to the same length with windows that score nothing.
- `StreamBatches`: the split laid out as `batch_size` contiguous streams, batch k holding window k
  of every stream, so a recurrent model can carry its state from one batch to the next
  (truncated BPTT, Zaremba et al. 2014). Under DDP each rank holds some of the streams (`rows`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


def already_batched(batch):
    """collate_fn for datasets whose `__getitems__` returns a ready batch."""
    return batch


def _gather(stream: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """One vectorised gather of `length` ids from each start: no per-sample Python work."""
    return torch.from_numpy(stream[starts[:, None] + np.arange(length)].astype(np.int64))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_rows(n_rows: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `n_rows` rows (shares differ by at most one row)."""
    return range(rank * n_rows // world_size, (rank + 1) * n_rows // world_size)


class TrainWindows(Dataset):
    """(x, y) windows of length block_size over the training stream; item i starts at token i.

    Addressing windows by their start lets one dataset serve any sampling: a shifted grid of
    non-overlapping windows, or nanoGPT's uniformly random starts.
    """

    def __init__(self, ids: np.ndarray, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return max(0, len(self.ids) - self.block_size)  # starts whose target window fits in the stream

    def __getitems__(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seq = _gather(self.ids, np.asarray(starts, dtype=np.int64), self.block_size + 1)
        return seq[:, :-1], seq[:, 1:]

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([start])
        return x[0], y[0]


class EvalWindows(Dataset):
    """Every token of a split as a target exactly once, in order; under DDP, this rank's share.

    The token just before the split (the last token of the previous split) is the context of the
    split's first token, so all of the split's bytes are predicted and bits per byte divides by
    exactly the split's byte count. Each of `world_size` ranks gets a contiguous run of
    ceil(windows / world_size) windows, the short ones padded with windows whose targets are all
    `IGNORE_INDEX`: every rank runs the same number of batches and no token is scored twice.

    `stride` < block_size scores with a sliding window (fairseq's `--context-window`): window k > 0
    starts `stride` tokens after window k-1 and scores only its last `stride` targets, so every
    token but the first block's is predicted from at least block_size - stride tokens of context.
    `stride` = block_size is the plain non-overlapping pass. Windows are gathered from `ids` (a
    memory map) a batch at a time, so a split is never held in memory as int64.
    """

    def __init__(
        self,
        ids: np.ndarray,
        block_size: int,
        context_token: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        stride: int | None = None,
    ) -> None:
        stride = block_size if stride is None else stride
        if not 1 <= stride <= block_size:
            raise ValueError(f"eval.stride must be in [1, block_size={block_size}] (got {stride})")
        self.ids, self.block_size, self.stride, self.context_token = ids, block_size, stride, context_token
        self.n_windows = 1 + _ceil_div(max(0, len(ids) - block_size), stride)
        per_rank = _ceil_div(self.n_windows, world_size)
        self.first, self.per_rank = rank * per_rank, per_rank

    def __len__(self) -> int:
        return self.per_rank

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [len(indices), block_size]: y is IGNORE_INDEX where a target is another window's
        (sliding), past the split's end, or in a padding window."""
        window = self.first + np.asarray(indices, dtype=np.int64)
        block, n = self.block_size, len(self.ids)
        # position p of the stream [context_token, *ids]: p = 0 is the context token, p = j + 1 is ids[j]
        positions = (window * self.stride)[:, None] + np.arange(block + 1)
        inside = (positions <= n) & (window < self.n_windows)[:, None]
        tokens = self.ids[np.clip(positions - 1, 0, max(0, n - 1))].astype(np.int64)
        tokens[positions == 0] = self.context_token
        x = np.where(inside[:, 1:], tokens[:, :-1], 0)  # an input only where its target is in the split
        scored = inside[:, 1:] & ((window == 0)[:, None] | (np.arange(block) >= block - self.stride))
        y = np.where(scored, tokens[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(x), torch.from_numpy(y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


class StreamBatches(Dataset):
    """A split as `batch_size` contiguous streams; item k is the k-th window of the streams in `rows`.

    Used with `batch_size=None` in the DataLoader and never shuffled: the order is the point.
    Training drops the ragged tail; evaluation pads it with `IGNORE_INDEX` so no token is skipped.
    `rows` (default: all) keeps only some streams, so DDP ranks split one layout between them and
    every rank runs the same number of batches. Each batch is gathered from `ids` when asked for.
    """

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        block_size: int,
        *,
        context_token: int | None = None,
        rows: range | None = None,
    ) -> None:
        self.ids, self.block_size, self.context_token = ids, block_size, context_token
        self.rows = np.asarray(range(batch_size) if rows is None else rows, dtype=np.int64)
        evaluating = context_token is not None
        n_targets = len(ids) if evaluating else len(ids) - 1
        if evaluating:  # round each stream up to whole windows; padding marks the unused tail
            self.n_windows = _ceil_div(_ceil_div(n_targets, batch_size), block_size)
        else:
            self.n_windows = (n_targets // batch_size) // block_size
        self.row_length, self.n_targets = self.n_windows * block_size, n_targets

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.n_windows:
            raise IndexError(index)
        # stream position p: with a context token, p = 0 is it and p = j + 1 is ids[j]; else p = j is ids[j]
        offset = 1 if self.context_token is not None else 0
        starts = self.rows * self.row_length + index * self.block_size
        positions = starts[:, None] + np.arange(self.block_size + 1)
        ends = (self.rows * self.row_length + self.row_length)[:, None]  # a row's own last target, exclusive
        tokens = self.ids[np.clip(positions - offset, 0, len(self.ids) - 1)].astype(np.int64)
        if offset:
            tokens[positions == 0] = self.context_token
        x_ok = (positions[:, :-1] < ends) & (positions[:, :-1] <= self.n_targets)
        y_ok = (positions[:, 1:] <= ends) & (positions[:, 1:] <= self.n_targets)
        x = np.where(x_ok, tokens[:, :-1], 0)
        y = np.where(y_ok, tokens[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(x), torch.from_numpy(y)

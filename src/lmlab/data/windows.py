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


def _pad(ids: np.ndarray, length: int, value: int) -> np.ndarray:
    out = np.full(length, value, dtype=np.int64)
    out[: len(ids)] = ids
    return out


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
    """

    def __init__(
        self, ids: np.ndarray, block_size: int, context_token: int = 0, *, rank: int = 0, world_size: int = 1
    ) -> None:
        n_windows = _ceil_div(len(ids), block_size)
        per_rank = _ceil_div(n_windows, world_size)
        first = min(rank * per_rank, n_windows) * block_size
        last = min((rank + 1) * per_rank, n_windows) * block_size
        stream = np.concatenate([[context_token], ids]).astype(np.int64)
        length = per_rank * block_size
        self.x = torch.from_numpy(_pad(stream[first:last], length, 0).reshape(per_rank, block_size))
        self.y = torch.from_numpy(
            _pad(stream[first + 1 : last + 1], length, IGNORE_INDEX).reshape(per_rank, block_size)
        )

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class StreamBatches(Dataset):
    """A split as `batch_size` contiguous streams; item k is the k-th window of the streams in `rows`.

    Used with `batch_size=None` in the DataLoader and never shuffled: the order is the point.
    Training drops the ragged tail; evaluation pads it with `IGNORE_INDEX` so no token is skipped.
    `rows` (default: all) keeps only some streams, so DDP ranks split one layout between them and
    every rank runs the same number of batches.
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
        evaluating = context_token is not None
        rows = range(batch_size) if rows is None else rows
        stream = np.concatenate([[context_token], ids]) if evaluating else np.asarray(ids)
        n_targets = len(stream) - 1
        if evaluating:  # round each stream up to whole windows; padding marks the unused tail
            n_windows = _ceil_div(_ceil_div(n_targets, batch_size), block_size)
        else:
            n_windows = (n_targets // batch_size) // block_size
        row = n_windows * block_size
        x = np.zeros((len(rows), row), dtype=np.int64)
        y = np.full((len(rows), row), IGNORE_INDEX, dtype=np.int64)
        for i, r in enumerate(rows):
            xs, ys = stream[r * row : r * row + row], stream[r * row + 1 : r * row + 1 + row]
            x[i, : len(xs)], y[i, : len(ys)] = xs, ys
        self.x = torch.from_numpy(x).view(len(rows), n_windows, block_size).transpose(0, 1)
        self.y = torch.from_numpy(y).view(len(rows), n_windows, block_size).transpose(0, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

"""Turning a stream of token ids into (input, target) batches.

Three shapes cover every use:
- `TrainWindows`: non-overlapping windows of the training stream, shuffled by the loader; one
  epoch sees every training token once.
- `EvalWindows`: a full, deterministic pass over a validation/test split in which every token of the
  split is a target exactly once (the last window is padded with `IGNORE_INDEX`).
- `StreamBatches`: the split laid out as `batch_size` contiguous streams, batch k holding window k
  of every stream, so a recurrent model can carry its state from one batch to the next
  (truncated BPTT, Zaremba et al. 2014).
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


class TrainWindows(Dataset):
    """Non-overlapping (x, y) windows of length block_size over the training stream."""

    def __init__(self, ids: np.ndarray, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size
        self.count = (len(ids) - 1) // block_size

    def __len__(self) -> int:
        return self.count

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seq = _gather(self.ids, np.asarray(indices) * self.block_size, self.block_size + 1)
        return seq[:, :-1], seq[:, 1:]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad(ids: np.ndarray, length: int, value: int) -> np.ndarray:
    out = np.full(length, value, dtype=np.int64)
    out[: len(ids)] = ids
    return out


class EvalWindows(Dataset):
    """Every token of a split as a target exactly once, in order.

    The token just before the split (the last token of the previous split) is the context of the
    split's first token, so all of the split's bytes are predicted and bits per byte divides by
    exactly the split's byte count.
    """

    def __init__(self, ids: np.ndarray, block_size: int, context_token: int = 0) -> None:
        n_windows = _ceil_div(len(ids), block_size)
        stream = np.concatenate([[context_token], ids]).astype(np.int64)
        self.x = torch.from_numpy(_pad(stream[:-1], n_windows * block_size, 0).reshape(n_windows, block_size))
        self.y = torch.from_numpy(_pad(stream[1:], n_windows * block_size, IGNORE_INDEX).reshape(n_windows, block_size))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class StreamBatches(Dataset):
    """A split as `batch_size` contiguous streams; item k is the k-th window of every stream.

    Used with `batch_size=None` in the DataLoader and never shuffled: the order is the point.
    Training drops the ragged tail; evaluation pads it with `IGNORE_INDEX` so no token is skipped.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, block_size: int, *, context_token: int | None = None) -> None:
        evaluating = context_token is not None
        stream = np.concatenate([[context_token], ids]) if evaluating else np.asarray(ids)
        n_targets = len(stream) - 1
        if evaluating:  # round each stream up to whole windows; padding marks the unused tail
            n_windows = _ceil_div(_ceil_div(n_targets, batch_size), block_size)
        else:
            n_windows = (n_targets // batch_size) // block_size
        row = n_windows * block_size
        x = np.zeros((batch_size, row), dtype=np.int64)
        y = np.full((batch_size, row), IGNORE_INDEX, dtype=np.int64)
        for r in range(batch_size):
            xs, ys = stream[r * row : r * row + row], stream[r * row + 1 : r * row + 1 + row]
            x[r, : len(xs)], y[r, : len(ys)] = xs, ys
        self.x = torch.from_numpy(x).view(batch_size, n_windows, block_size).transpose(0, 1)
        self.y = torch.from_numpy(y).view(batch_size, n_windows, block_size).transpose(0, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

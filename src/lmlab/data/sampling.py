"""A training order that survives a restart: a seeded shuffle per epoch and a loader that knows its place.

Lightning saves the `state_dict()` of a train DataLoader that has one and hands it back through
`load_state_dict()` before iterating again. `ResumableDataLoader` answers with the epoch and the
number of batches it has delivered; `EpochSampler` recomputes that epoch's order from the seed and
starts after those batches. A run resumed mid-epoch therefore sees exactly the batches the
interrupted run had not reached, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled by (seed, epoch) or in order, optionally starting part-way through.

    The permutation depends on the seed and the epoch only, never on the global RNG, so it can be
    recomputed after a restart. Lightning calls `set_epoch` before each epoch.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, index) an interrupted run had reached

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, index: int) -> None:
        """Make the next pass over `epoch` start at `index` (a run interrupted at the very end of
        an epoch goes on with the next epoch, which starts at 0)."""
        self.epoch, self._resume = epoch, (epoch, index)

    @property
    def start(self) -> int:
        """Where the next pass starts in this epoch's order."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def order(self) -> np.ndarray:
        """The whole epoch's order."""
        if not self.shuffle:
            return np.arange(self.length)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.length)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        start, self._resume = self.start, None  # only the first pass after a restart skips
        yield from self.order()[start:].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose position is saved in checkpoints.

    It counts the batches it has handed to the training loop (not those its workers prefetched),
    so the saved position is exactly what training consumed. Under DDP Lightning replaces the
    sampler by a distributed one, which orders each epoch itself: a resume then restarts the
    interrupted epoch's order from its start.
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch = 0
        self._delivered = 0

    @property
    def _samples_per_batch(self) -> int:
        return self.batch_size or 1  # batch_size=None: the dataset yields whole batches

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first next(), after Lightning has called set_epoch / load_state_dict.
        own = isinstance(self.sampler, EpochSampler)
        self._epoch = self.sampler.epoch
        self._delivered = self.sampler.start // self._samples_per_batch if own else 0
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochSampler):
            self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * self._samples_per_batch)

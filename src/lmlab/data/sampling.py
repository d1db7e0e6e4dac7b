"""Which training windows an epoch visits, on which rank, in which order; and a loader that knows its place.

Every order here is a function of (seed, epoch, rank, world size) only, never of the global RNG, so
it can be recomputed after a restart. Lightning saves the `state_dict()` of a train DataLoader that
has one and hands it back through `load_state_dict()` before iterating again: `ResumableDataLoader`
answers with the epoch and the number of batches it has delivered, and the sampler recomputes that
epoch's order and starts after those batches. A run resumed mid-epoch, on one process or under DDP,
therefore sees exactly the batches the interrupted run had not reached, in the same order.

Two ways to pick training windows (`data.sampling`):
- `epoch`: non-overlapping windows on a grid shifted by a random offset in [0, block_size) each
  epoch, visited in a shuffled order. Every epoch sees each training token at most once, and a
  small corpus trained for many epochs never repeats the same windows.
- `random`: windows starting at uniformly random positions, as nanoGPT draws them. An "epoch" is
  as many windows as the `epoch` mode visits, so both modes count steps per epoch alike.

An epoch of up to EXACT_ORDER_MAX windows (about 1 million: corpora up to 64M tokens at context
64) is drawn whole with numpy, as it always was. A larger one is computed a chunk at a time from a
keyed bijection of the positions, so a run on a corpus of gigabytes neither holds tens of millions
of indices nor waits for them to be shuffled before its first step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.errors import ConfigError

SAMPLING_MODES = ("epoch", "random")
EXACT_ORDER_MAX = 1 << 20  # windows per epoch drawn whole (8 MB of indices); above it, computed lazily
CHUNK = 1 << 16  # indices handed to the loader per slice of the order
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit hash of each element and `key` (splitmix64's finaliser): the same bits on every machine."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((key * 0x9E3779B97F4A7C15) & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class KeyedPermutation:
    """A shuffled order of range(n) that is computed position by position, never held whole.

    A four-round Feistel network on the smallest even number of bits that covers n is a bijection of
    that power-of-two range; cycle-walking (applying it again to values >= n, at most a few times as
    the range is under 4n) restricts it to a bijection of range(n). The rounds are keyed by `key`.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int) -> None:
        self.n = n
        self.half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        self.keys = [int(k) for k in np.random.default_rng(key).integers(0, 2**63, size=self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        bits = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> bits, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << bits) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The items at these positions of the order (positions in range(n))."""
        out = self._feistel(positions.astype(np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


def check_sampling_mode(mode: str) -> str:
    """`mode` if it names a sampling mode; a one-line error saying the choices otherwise."""
    if mode not in SAMPLING_MODES:
        raise ConfigError(f"data.sampling={mode!r} is not a sampling mode: set data.sampling to 'epoch' or 'random'")
    return mode


def windows_per_epoch(n_tokens: int, block_size: int) -> int:
    """Non-overlapping (x, y) windows that fit in `n_tokens` at any grid offset (at least one if one fits at all)."""
    if n_tokens <= block_size:
        return 0
    return max(1, (n_tokens - block_size) // block_size)


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled by (seed, epoch) or in order, optionally starting part-way through.

    The permutation depends on the seed and the epoch only, never on the global RNG, so it can be
    recomputed after a restart. Lightning calls `set_epoch` before each epoch.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int = 0) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, index) an interrupted run had reached
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, its exact order), drawn once per epoch

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
        """The whole epoch's order (materialised: for small epochs and for tests)."""
        return self.at(np.arange(self.length))

    def at(self, positions: np.ndarray) -> np.ndarray:
        """This epoch's items at these positions of its order."""
        if not self.shuffle:
            return positions
        if self.length <= EXACT_ORDER_MAX:
            return self._drawn()[positions]
        return KeyedPermutation(self.length, _epoch_key(self.seed, self.epoch))(positions)

    def _draw(self) -> np.ndarray:
        """The whole epoch drawn with numpy (epochs of up to EXACT_ORDER_MAX)."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.length)

    def _drawn(self) -> np.ndarray:
        """`_draw()` for the current epoch, drawn once."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._draw())
        return self._cached[1]

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        start, self._resume = self.start, None  # only the first pass after a restart skips
        for lo in range(start, self.length, CHUNK):
            yield from self.at(np.arange(lo, min(lo + CHUNK, self.length))).tolist()


def _epoch_key(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 1]).integers(0, 2**63))


class WindowSampler(EpochSampler):
    """Start positions of one rank's training windows for each epoch (`data.sampling`: epoch or random).

    All ranks draw the same epoch-wide list of starts from (seed, epoch); rank r takes every
    world_size-th of them from position r. So the windows of one step, over all ranks, are the
    windows one process would take with world_size x the batch, and no window goes to two ranks.
    """

    def __init__(
        self, n_tokens: int, block_size: int, *, mode: str = "epoch", seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n_tokens, self.block_size, self.mode = n_tokens, block_size, check_sampling_mode(mode)
        self.rank, self.world_size = rank, world_size
        self.count = windows_per_epoch(n_tokens, block_size)
        super().__init__(self.count // world_size, shuffle=True, seed=seed)  # equal shares: DDP steps stay in step

    def epoch_starts(self) -> np.ndarray:
        """This epoch's starts for all ranks together, in the order one process would visit them."""
        return self._starts_at(np.arange(self.count))

    def _starts_at(self, positions: np.ndarray) -> np.ndarray:
        """The epoch-wide list of starts, at these positions."""
        if self.count <= EXACT_ORDER_MAX:
            return self._drawn()[positions]
        key = _epoch_key(self.seed, self.epoch)
        if self.mode == "random":  # uniform starts, one hash per position
            return (_mix(positions, key) % np.uint64(self.n_tokens - self.block_size)).astype(np.int64)
        return self._grid_offset() + self.block_size * KeyedPermutation(self.count, key)(positions)

    def _draw(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "random":
            return rng.integers(0, self.n_tokens - self.block_size, size=self.count)
        offset = rng.integers(self._offset_room())
        return offset + self.block_size * rng.permutation(self.count)

    def _offset_room(self) -> int:
        # the largest offset that still leaves room for `count` windows (block_size - 1 unless the corpus is tiny)
        return min(self.block_size, self.n_tokens - self.count * self.block_size)

    def _grid_offset(self) -> int:
        return int(np.random.default_rng([self.seed, self.epoch]).integers(self._offset_room()))

    def at(self, positions: np.ndarray) -> np.ndarray:
        return self._starts_at(self.rank + self.world_size * positions)


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose position is saved in checkpoints.

    It counts the batches it has handed to the training loop (not those its workers prefetched),
    so the saved position is exactly what training consumed. Every rank delivers the same number
    of batches, so rank 0's count (the one a checkpoint holds) is every rank's place.
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

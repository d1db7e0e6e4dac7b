"""Callbacks lmlab adds to Lightning's own (checkpointing, LR monitor and the rich progress bar)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class TokenThroughput(pl.Callback):
    """Training tokens per second, shown in the progress bar and logged as `train/tokens_per_s`.

    Measured over `every_n_steps` optimizer steps, so reading the clock never forces a device sync
    inside a step.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch[1].numel() * trainer.world_size
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            elapsed = time.perf_counter() - self._start
            pl_module.log("train/tokens_per_s", self._tokens / max(elapsed, 1e-9), prog_bar=True, on_step=True,
                          on_epoch=False, rank_zero_only=True)
            self._start, self._tokens = time.perf_counter(), 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = None  # evaluation time is not training throughput

"""The one known difference between lmlab's PTB recipe and Zaremba et al.'s Torch code, as a callback.

Zaremba's `main.lua` copies the carried state into a step's input *before* it notices the end of
the training data and zeroes that state. Validation runs at every epoch's end and leaves its own
last state there, so the Torch code's first step of each epoch starts from the validation's last
state. lmlab starts every epoch from zeros, as the TensorFlow tutorial and PyTorch's example do.
This callback reproduces the Torch behaviour, so the two can be compared on the same card:

    python bench/recipes.py ptb_lstm_medium data.eval_batch_size=20 \
        +callbacks.epoch_start._target_=bench.zaremba_epoch_start.ValidationStateAtEpochStart

Validation must run as many streams as training (`data.eval_batch_size` = `data.batch_size`, 20 in
the paper), for its state to be one training can start from.
"""

from __future__ import annotations

import pytorch_lightning as pl

from lmlab.graphed_step import state_tensors


class ValidationStateAtEpochStart(pl.Callback):
    """From the second epoch on, the first training step starts from the last validation's final state."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx != 0 or trainer.current_epoch == 0:
            return  # the first epoch starts from zeros, as the Torch code's does
        state = pl_module._eval_state
        if state is None:
            raise RuntimeError("no validation ran before this epoch: set trainer.val_check_interval=1.0")
        streams, rows = state_tensors(state)[0].size(1), batch[0].size(0)  # [layers, streams, width]
        if streams != rows:
            raise RuntimeError(f"validation ran {streams} streams and training {rows}: set data.eval_batch_size={rows}")
        pl_module.carried_state = state

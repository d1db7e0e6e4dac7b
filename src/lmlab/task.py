"""One LightningModule trains every architecture: loss, metrics and optimizer wiring live here.

The model is any `lmlab.models.LanguageModel`; nothing below branches on its architecture.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from lmlab.data.windows import IGNORE_INDEX
from lmlab.models import LanguageModel, count_parameters, detach_state
from lmlab.optim import parameter_groups

LN2 = math.log(2)


class LanguageModelTask(pl.LightningModule):
    """Next-token cross-entropy training with bits-per-byte evaluation over full splits.

    Bits per byte = (sum of the split's token losses in bits) / (UTF-8 bytes of the split's raw
    text). Unlike per-token perplexity it does not depend on how the text was tokenized, so it
    ranks char, word and BPE runs on the same scale.
    """

    def __init__(self, model: LanguageModel, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
                 label_smoothing: float = 0.0, stateful: bool = False) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing, self.stateful = label_smoothing, stateful
        self.tokens_seen = 0
        self._train_state = self._eval_state = None
        self.eval_nats, self.eval_tokens = SumMetric(), SumMetric()

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def forward(self, idx: torch.Tensor, state=None):
        return self.model(idx, state)

    def _logits(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Run the model, carrying recurrent state across batches when the data is stateful."""
        if not self.stateful:
            return self.model(x)[0]
        state = self._train_state if training else self._eval_state
        logits, state = self.model(x, state)
        if training:
            self._train_state = detach_state(state)
        else:
            self._eval_state = state
        return logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self._logits(x, training=True)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)
        self.tokens_seen += y.numel()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_state = None

    def _eval_step(self, batch) -> None:
        x, y = batch
        logits = self._logits(x, training=False)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        self.eval_nats.update(nats)
        self.eval_tokens.update((y != IGNORE_INDEX).sum())

    def _eval_epoch_start(self) -> None:
        self._eval_state = None
        self.eval_nats.reset()
        self.eval_tokens.reset()

    def _eval_epoch_end(self, split: str) -> None:
        nats, tokens = self.eval_nats.compute().double(), self.eval_tokens.compute().double()
        corpus = self.trainer.datamodule.corpus
        # A full pass scores every token of the split; a partial one (limit_*_batches) is scaled by tokens.
        split_bytes = corpus.split_bytes[split] * min(1.0, tokens.item() / max(1, corpus.split_tokens[split]))
        loss = nats / tokens.clamp(min=1)
        self.log_dict({f"{split}/loss": loss.float(), f"{split}/ppl": torch.exp(loss).float(),
                       f"{split}/bpb": (nats / LN2 / split_bytes).float(),
                       f"{split}/unk_rate": torch.tensor(corpus.unk_rate(split))},
                      prog_bar=split == "val", sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start()

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        factory = self.optimizer_factory
        keywords = getattr(factory, "keywords", {})
        extra = {}
        accepts = inspect.signature(getattr(factory, "func", factory)).parameters
        if "fused" in accepts and "fused" not in keywords and self.device.type == "cuda":
            extra["fused"] = True  # one kernel for the whole update
        optimizer = factory(parameter_groups(self.model, keywords.get("weight_decay", 0.0)), **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

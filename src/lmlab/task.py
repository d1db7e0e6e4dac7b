"""One LightningModule trains every architecture: loss, metrics and optimizer wiring live here.

The model is any `lmlab.models.LanguageModel`; nothing below branches on its architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import SumMetric

from lmlab.data.windows import IGNORE_INDEX
from lmlab.errors import ConfigError
from lmlab.graphed_step import GraphCaptureError, GraphedTrainingStep
from lmlab.lightning_compat import first_validation_step, uses_loss_scaler
from lmlab.metrics import split_scores, token_nats
from lmlab.models import LanguageModel, count_parameters, detach_state
from lmlab.optim import ValidationPlateau, build_optimizer, decayed_parameters, lightning_scheduler, schedule_arguments
from lmlab.optim.schedule_free import EvalWeights
from lmlab.perf import Perf, fast_loss, pinned_attention, training_graph


class LanguageModelTask(pl.LightningModule):
    """Next-token cross-entropy training with bits-per-byte evaluation over full splits.

    Bits per byte = (sum of the split's token losses in bits) / (UTF-8 bytes of the split's raw
    text). Unlike per-token perplexity it does not depend on how the text was tokenized, so it
    ranks char, word and BPE runs on the same scale.
    """

    def __init__(
        self,
        model: LanguageModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        stateful: bool = False,
        loss_chunk_rows: int = 0,
        perf: Perf | None = None,
        eval_carries_state: bool | None = None,
    ) -> None:
        """`model` as `lmlab.perf.apply_perf` left it; `perf` the same switches, for the step (compiled
        loss, attention kernel, CUDA graphs). `eval_carries_state`: validation and test carry the state
        from batch to batch (eval.context=carry); by default they do when training does."""
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                f"label_smoothing must be in [0, 1] (got {label_smoothing}): e.g. task.label_smoothing=0.1"
            )
        if loss_chunk_rows < 0:
            raise ValueError(f"task.loss_chunk_rows must be >= 0 (got {loss_chunk_rows}): 0 scores all rows at once")
        self.model = model
        self.perf = perf or Perf()
        self._decayed = decayed_parameters(model)  # before FSDP turns every parameter into a 1-D shard
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.label_smoothing, self.stateful = weight_decay, label_smoothing, stateful
        self.eval_carries_state = stateful if eval_carries_state is None else eval_carries_state
        self.loss_chunk_rows = loss_chunk_rows
        self._loss = fast_loss(self._next_token_loss, self.perf)
        self._attention = pinned_attention(self.perf)
        self._graphed: GraphedTrainingStep | None = None
        self.tokens_seen = 0
        self.carried_state = self._eval_state = None  # carried_state: training's, saved by lmlab.callbacks.ExactResume
        # float64 sums: the same bits per byte to the last digit on 1 or N processes
        self.eval_nats, self.eval_tokens = SumMetric().set_dtype(torch.float64), SumMetric().set_dtype(torch.float64)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def forward(self, idx: torch.Tensor, state=None):
        return self.model(idx, state)

    def _next_token_loss(self, x: torch.Tensor, y: torch.Tensor, state, label_smoothing: float, reduction: str):
        """Cross-entropy, the new state, and the model's auxiliary loss (None without one), from one
        compiled region: reading the auxiliary loss after a compiled call would miss it."""
        logits, state = self.model(x, state)
        loss = token_nats(
            logits, y, label_smoothing=label_smoothing, reduction=reduction, chunk_rows=self.loss_chunk_rows
        )
        return loss, state, self.model.aux_loss()

    def _pinned_loss(self, x: torch.Tensor, y: torch.Tensor, state, training: bool):
        """`_loss` under the pinned attention kernel: the mean training loss or the summed nats."""
        with self._attention(x):
            return self._loss(x, y, state, self.label_smoothing if training else 0.0, "mean" if training else "sum")

    def _step_loss(self, x: torch.Tensor, y: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean loss (training) or summed nats (evaluation), and the auxiliary loss, carrying recurrent
        state across batches when the data is stateful (evaluation: when it carries state)."""
        carry = self.stateful if training else self.eval_carries_state
        state = (self.carried_state if training else self._eval_state) if carry else None
        loss, state, aux = self._pinned_loss(x, y, state, training)
        if carry and training:
            self.carried_state = detach_state(state)
        elif carry:
            self._eval_state = state
        return loss, aux

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss, aux = self._graphed_step(x, y) if self._graphed is not None else self._step_loss(x, y, training=True)
        self.tokens_seen += y.numel()
        # Logged only on the steps the loggers write (Lightning's own rule), and not prog_bar=True,
        # which would turn it into a Python float after every batch: a host-device sync per step.
        # SyncFreeProgressBar shows it on the same steps. train/loss is the cross-entropy alone.
        every = self.trainer.log_every_n_steps  # 0: never (Trainer(barebones=True) sets it)
        if every and (self.global_step + 1) % every == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False)
            if aux is not None:
                self.log("train/aux_loss", aux, on_step=True, on_epoch=False)
        return loss if aux is None else loss + aux

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """End on the last step as a stopped run ends: with a validation, so its score and checkpoints
        cover every step trained. Lightning otherwise finishes at max_steps without validating when the
        validation interval does not divide it (1,850 steps every 500: last.ckpt and the score would be
        step 1,500's, and the last 350 steps lost)."""
        trainer = self.trainer
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_train_epoch_start(self) -> None:
        self.carried_state = None

    # --- CUDA graphs (lmlab.graphed_step, chosen by lmlab.perf): forward and backward replayed, the rest eager ---

    def _graphed_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = None
        if self.stateful:
            state = self.carried_state if self.carried_state is not None else self.model.init_state(x.size(0), x.device)
        try:
            loss, aux, state = self._graphed(x, y, state)
        except GraphCaptureError as err:
            if self.perf.cuda_graphs is True:
                raise ConfigError(
                    f"perf.cuda_graphs=true: this model's step cannot be captured ({err}); set perf.cuda_graphs=false"
                ) from None
            rank_zero_warn(f"perf.cuda_graphs=auto: this model's step cannot be captured ({err}); training eagerly")
            self._graphed = None  # this step and the rest run eagerly, Lightning's backward included
            return self._step_loss(x, y, training=True)
        if self.stateful:
            self.carried_state = state
        return loss, aux

    def _graph_step_function(self, x: torch.Tensor, y: torch.Tensor, state):
        loss, state, aux = self._pinned_loss(x, y, state, training=True)
        return (loss if aux is None else loss + aux), loss, aux, state

    def on_fit_start(self) -> None:
        self._graphed = training_graph(self._graph_step_function, self.trainer, self.model, self.perf, self.stateful)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self._graphed is None:  # a graphed step writes its gradients itself, into tensors it keeps
            optimizer.zero_grad()

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self._graphed is None:  # a graphed step has already computed the gradients
            super().backward(loss, *args, **kwargs)

    # --- end of CUDA graphs ---

    def _eval_step(self, batch) -> None:
        x, y = batch
        self.eval_nats.update(self._step_loss(x, y, training=False)[0])
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
        scores = split_scores(split, nats, tokens, split_bytes)
        scores[f"{split}/unk_rate"] = torch.tensor(corpus.unk_rate(split))
        self.log_dict(scores, logger=False, sync_dist=False)  # SyncFreeProgressBar shows val/bpb
        # Lightning would write these at the step before the one just validated; curve.csv, the samples
        # and the checkpoints all name the optimizer step, so the dashboards do too. The end-of-run
        # validation and test of the best checkpoint are recorded once, by lmlab.run.dashboards.log_final.
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            values = {key: float(value) for key, value in scores.items()}
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    # --- Per-token test nats, kept for the paired bootstrap of two runs (lmlab.callbacks.SaveTestBlocks) ---

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start()
        self.test_token_nats: list[torch.Tensor] = []

    def test_step(self, batch, batch_idx: int) -> None:
        """As validation, but every target's nats are also kept, on the device and in this rank's batch
        order, as a tensor shaped like the targets with -1 where a target is padding."""
        x, y = batch
        state = self._eval_state if self.eval_carries_state else None
        nats, state, _ = self._loss(x, y, state, 0.0, "none")
        if self.eval_carries_state:
            self._eval_state = state
        self.eval_nats.update(nats.sum())
        self.eval_tokens.update((y != IGNORE_INDEX).sum())
        nats = nats.detach().float().view_as(y)
        self.test_token_nats.append(torch.where(y == IGNORE_INDEX, -1.0, nats))

    # --- end of the per-token test nats ---

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        factory = self.optimizer_factory
        extra = {}
        accepts = inspect.signature(getattr(factory, "func", factory)).parameters
        if (
            "fused" in accepts
            and "fused" not in getattr(factory, "keywords", {})
            and self.device.type == "cuda"
            and not uses_loss_scaler(self.trainer)
        ):
            extra["fused"] = True  # one kernel for the whole update (not with fp16's loss scaler)
        optimizer = build_optimizer(factory, self.model, self.weight_decay, self._decayed, self.device, **extra)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, **schedule_arguments(self.scheduler_factory, total_steps))
        validates = (
            first_validation_step(self.trainer, total_steps) if isinstance(scheduler, ValidationPlateau) else None
        )
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler(scheduler, validates_by_step=validates)}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Schedule-free optimizers: averaged weights for evaluation and checkpoints (lmlab.optim.schedule_free)."""
        return [EvalWeights()]

    def on_validation_end(self) -> None:
        """Tell a plateau schedule that a fresh val/bpb is logged (lmlab.optim.ValidationPlateau)."""
        if self.trainer.sanity_checking:
            return
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ValidationPlateau):
                config.scheduler.validation_ended()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip directly when no loss scaler is involved (fp32, bf16).

        Lightning refuses to clip for any fused optimizer under mixed precision, because with fp16
        loss scaling the gradients would still be scaled; bf16 has no scaler, so they are not.
        """
        if not gradient_clip_val or uses_loss_scaler(self.trainer):
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

"""One LightningModule trains every architecture: loss, metrics and optimizer wiring live here.

The model is any `lmlab.models.LanguageModel`; nothing below branches on its architecture.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device, rank_zero_warn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import SumMetric

from lmlab.data.windows import IGNORE_INDEX
from lmlab.errors import ConfigError
from lmlab.graphed_step import GraphCaptureError, GraphedTrainingStep, state_tensors
from lmlab.metrics import split_scores, token_nats
from lmlab.models import LanguageModel, count_parameters, detach_state, state_from_data, state_to_data
from lmlab.models.float8 import check_float8_device, use_float8_matmuls
from lmlab.optim import ValidationPlateau, build_optimizer, decayed_parameters, lightning_scheduler, schedule_arguments
from lmlab.optim.schedule_free import EvalWeights

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


SHORT_CPU_CONTEXT = 128  # up to here a CPU trains faster with the math attention kernel (auto_attention)


def attention_context(name: str) -> Callable[[torch.Tensor], contextlib.AbstractContextManager]:
    """A context, given the batch's token ids, that pins scaled_dot_product_attention to one kernel
    (`task.attention`); "auto" is `auto_attention`. On Hopper, cuDNN's attention is often faster than
    flash for training."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"task.attention must be one of {', '.join(ATTENTION_BACKENDS)} (got {name!r})")
    if name == "auto":
        return auto_attention
    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return lambda idx: sdpa_kernel([backend])


def auto_attention(idx: torch.Tensor) -> contextlib.AbstractContextManager:
    """PyTorch's choice of kernel, except for contexts of up to 128 tokens on a CPU. There its flash
    kernel's backward takes about 8x its forward, and the plain math kernel trains the default GPT
    1.35x faster under bf16 (level in fp32); from 256 tokens flash is faster (docs/benchmarks.md)."""
    if idx.device.type == "cpu" and idx.size(-1) <= SHORT_CPU_CONTEXT:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


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
        compile: bool = False,
        compile_mode: str | None = None,
        compile_ddp: str = "split",
        float8: bool = False,
        loss_chunk_rows: int = 0,
        attention: str = "auto",
        cuda_graphs: bool | str = "auto",
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                f"label_smoothing must be in [0, 1] (got {label_smoothing}): e.g. task.label_smoothing=0.1"
            )
        if activation_checkpointing and not model.has_repeated_blocks:
            raise ValueError(
                "task.activation_checkpointing=true needs a model made of repeated blocks (gpt, transformer, llama, "
                f"mamba, jamba); {type(model).__name__} has none: set task.activation_checkpointing=false"
            )
        self.model = model
        # inside the model, around each block: the same under every strategy (FSDP's units are those blocks)
        model.activation_checkpointing = activation_checkpointing
        self.float8 = float8
        if float8:  # the same parameter objects afterwards: decay groups and tying are unchanged
            use_float8_matmuls(model)
        self._decayed = decayed_parameters(model)  # before FSDP turns every parameter into a 1-D shard
        self._resumed_rng: dict | None = None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.label_smoothing, self.stateful = weight_decay, label_smoothing, stateful
        # Model and loss compiled together (the fp32 log-softmax over the vocabulary fuses into
        # one kernel), as a function rather than a compiled module: checkpoints keep plain
        # parameter names and generation keeps the eager model's free shapes.
        # compile_mode: torch.compile's mode ("max-autotune-no-cudagraphs", ...); None is its default.
        self._loss = torch.compile(self._next_token_loss, mode=compile_mode) if compile else self._next_token_loss
        if loss_chunk_rows < 0:
            raise ValueError(f"task.loss_chunk_rows must be >= 0 (got {loss_chunk_rows}): 0 scores all rows at once")
        self.loss_chunk_rows = loss_chunk_rows
        if compile_ddp not in ("split", "whole"):
            raise ValueError(f"task.compile_ddp must be split or whole (got {compile_ddp!r})")
        self._compiled_ddp_split = None if not compile else compile_ddp == "split"
        self._attention = attention_context(attention)
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"task.cuda_graphs must be auto, true or false (got {cuda_graphs!r})")
        self.cuda_graphs, self.compile_mode = cuda_graphs, compile_mode if compile else None
        self._graphed: GraphedTrainingStep | None = None
        self.tokens_seen = 0
        self._train_state = self._eval_state = None
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
        state across batches when the data is stateful."""
        state = (self._train_state if training else self._eval_state) if self.stateful else None
        loss, state, aux = self._pinned_loss(x, y, state, training)
        if self.stateful and training:
            self._train_state = detach_state(state)
        elif self.stateful:
            self._eval_state = state
        return loss, aux

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss, aux = self._graphed_step(x, y) if self._graphed is not None else self._step_loss(x, y, training=True)
        self.tokens_seen += y.numel()
        # Logged only on the steps the loggers write (Lightning's own rule), and not prog_bar=True,
        # which would turn it into a Python float after every batch: a host-device sync per step.
        # SyncFreeProgressBar shows it on the same steps. train/loss is the cross-entropy alone.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
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
        self._train_state = None

    # --- CUDA graphs (lmlab.graphed_step): forward and backward replayed, the rest of the step eager ---

    def _graphed_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = None
        if self.stateful:
            state = self._train_state if self._train_state is not None else self.model.init_state(x.size(0), x.device)
        try:
            loss, aux, state = self._graphed(x, y, state)
        except GraphCaptureError as err:
            if self.cuda_graphs is True:
                raise ConfigError(
                    f"task.cuda_graphs=true: this model's step cannot be captured ({err}); set task.cuda_graphs=false"
                ) from None
            rank_zero_warn(f"task.cuda_graphs=auto: this model's step cannot be captured ({err}); training eagerly")
            self._graphed = None  # this step and the rest run eagerly, Lightning's backward included
            return self._step_loss(x, y, training=True)
        if self.stateful:
            self._train_state = state
        return loss, aux

    def _graph_step_function(self, x: torch.Tensor, y: torch.Tensor, state):
        loss, state, aux = self._pinned_loss(x, y, state, training=True)
        return (loss if aux is None else loss + aux), loss, aux, state

    def cuda_graph_obstacle(self) -> str | None:
        """Why this run cannot replay its training step as a CUDA graph, or None if it can."""
        trainer = self.trainer
        if self.device.type != "cuda":
            return "training does not run on a CUDA GPU"
        if trainer.world_size > 1:
            return "the run is distributed (CUDA graphs are used on one GPU: trainer.devices=1)"
        if trainer.accumulate_grad_batches > 1:
            return "gradients are accumulated over batches (trainer.accumulate_grad_batches > 1)"
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return "fp16 loss scaling checks every step's gradients on the host (use bf16-mixed)"
        if self.model.has_data_dependent_shapes():
            return "the model's shapes depend on the data (mixture-of-experts routing)"
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            return f"torch.compile's mode {self.compile_mode!r} captures CUDA graphs itself"
        if self.stateful and state_tensors(self.model.init_state(1, "meta")) is None:
            return "the model's recurrent state is not a tensor or tuple of tensors"
        return None

    def on_fit_start(self) -> None:
        if self.float8 and self.device.type == "cuda":  # train.py has warned already on a CPU
            check_float8_device(self.device)
        if self._compiled_ddp_split is not None and self.trainer.world_size > 1:
            # split: Dynamo's DDPOptimizer cuts the compiled graph at DDP's gradient buckets so that
            # each all-reduce overlaps the rest of the backward; whole: one graph, fused throughout,
            # its gradients all-reduced after it (faster where the link is fast: docs/distributed.md)
            torch._dynamo.config.optimize_ddp = self._compiled_ddp_split
        self._graphed = None
        if self.cuda_graphs is False:
            return
        obstacle = self.cuda_graph_obstacle()
        if obstacle is None:
            self._graphed = GraphedTrainingStep(self._graph_step_function, list(self.model.parameters()))
        elif self.cuda_graphs is True:
            raise ConfigError(f"task.cuda_graphs=true cannot be used: {obstacle}; set task.cuda_graphs=auto or false")

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
        # and the checkpoints all name the optimizer step, so the dashboards do too.
        if not self.trainer.sanity_checking:
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
        state = self._eval_state if self.stateful else None
        nats, state, _ = self._loss(x, y, state, 0.0, "none")
        if self.stateful:
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
            and getattr(self.trainer.precision_plugin, "scaler", None) is None
        ):
            extra["fused"] = True  # one kernel for the whole update (not with fp16's loss scaler)
        optimizer = build_optimizer(factory, self.model, self.weight_decay, self._decayed, self.device, **extra)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, **schedule_arguments(self.scheduler_factory, total_steps))
        validates = self._first_validation_step(total_steps) if isinstance(scheduler, ValidationPlateau) else None
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler(scheduler, validates_by_step=validates)}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Schedule-free optimizers: averaged weights for evaluation and checkpoints (lmlab.optim.schedule_free)."""
        return [EvalWeights()]

    def _first_validation_step(self, total_steps: int) -> int | None:
        """The optimizer step of this run's first validation, or None if it never validates by its last step
        (a plateau schedule needs one). Time-based validation (val_check_interval as a duration) counts as 1."""
        trainer = self.trainer
        if not trainer.enable_validation:
            return None
        interval = trainer.val_check_interval
        if isinstance(interval, int):
            batches = interval
        elif isinstance(interval, float):  # a fraction of an epoch, as Lightning reads it
            batches = max(1, int(trainer.num_training_batches * interval))
        else:
            return 1
        if trainer.check_val_every_n_epoch is not None:  # counted within epochs, every n-th epoch
            batches += (trainer.check_val_every_n_epoch - 1) * trainer.num_training_batches
        step = -(-batches // trainer.accumulate_grad_batches)
        return int(step) if step <= total_steps else None

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
        if not gradient_clip_val or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        # For an exact resume: the recurrent state carried into the next batch, and the RNG that
        # draws the next dropout masks (Lightning restores neither).
        checkpoint["carried_state"] = state_to_data(self._train_state)
        if self.trainer.world_size > 1:  # each rank carries the state of its own streams: keep them all
            every = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(every, move_data_to_device(state_to_data(self._train_state), "cpu"))
            checkpoint["carried_state_by_rank"] = every
        checkpoint["rng_states"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self._train_state = state_from_data(checkpoint.get("carried_state"))
        by_rank = checkpoint.get("carried_state_by_rank")
        if by_rank is not None:
            if len(by_rank) != self.trainer.world_size:
                raise ConfigError(
                    f"this stateful checkpoint was saved by {len(by_rank)} processes: "
                    f"resume it with trainer.devices={len(by_rank)}"
                )
            self._train_state = state_from_data(by_rank[self.trainer.global_rank])
        self._resumed_rng = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Applied here, after Lightning's own setup has drawn from the RNG, so that the first
        # resumed step sees the state the interrupted run's next step would have seen.
        if self._resumed_rng is not None:
            torch.set_rng_state(self._resumed_rng["cpu"])
            if len(self._resumed_rng["cuda"]) == torch.cuda.device_count() > 0:
                torch.cuda.set_rng_state_all(self._resumed_rng["cuda"])
            self._resumed_rng = None
        if self._train_state is not None:
            self._train_state = move_data_to_device(self._train_state, self.device)

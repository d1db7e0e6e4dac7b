"""Every place lmlab reaches into Lightning's internals, in one module, each pinned by a test.

Pinned to pytorch-lightning 2.6.6. Each piece below either works around a Lightning behaviour that
lmlab cannot use as it is, or reads something Lightning keeps private. tests/test_lightning_compat.py
holds one test per piece that fails when upstream changes what it relies on (the behaviour it works
around is gone, or the private name moved): then the piece is removed or updated, here only.
"""

from __future__ import annotations

from typing import Any

import fsspec
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def uses_loss_scaler(trainer: pl.Trainer) -> bool:
    """Whether the run scales its loss (fp16 mixed precision): then gradients are scaled until the
    optimizer step, a fused optimizer must not be asked for, clipping goes through Lightning, and the
    step cannot be a CUDA graph. Only Lightning's mixed-precision plugins have a `scaler`."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def uses_distributed_sampler(trainer: pl.Trainer) -> bool:
    """`Trainer(use_distributed_sampler=...)`, which Lightning keeps on its private accelerator connector."""
    return bool(getattr(trainer._accelerator_connector, "use_distributed_sampler", False))


def is_local_path(path: Any) -> bool:
    """Whether a checkpoint path is on the local file system (not s3://, gs://, ...), as Lightning's
    private `_is_local_file_protocol` decides it: fsspec's protocol of the path is `file`."""
    return fsspec.utils.get_protocol(str(path)) == "file"


def planned_world_size(trainer_cfg: DictConfig) -> int:
    """The processes a Trainer built from `trainer_cfg` will run (`trainer.world_size`), known before
    it is built, so that step budgets can be settled first and the Trainer given its max_steps up
    front. Lightning's own device parsing: CPU processes or CUDA devices, times `num_nodes`."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    kind = CUDAAccelerator if accelerator in ("cuda", "gpu") else CPUAccelerator
    devices = trainer_cfg.get("devices", "auto")
    if str(devices) == "auto":
        count = kind.auto_device_count()
    else:
        devices = list(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else devices
        count = len(kind.get_parallel_devices(kind.parse_devices(devices)))
    return count * int(trainer_cfg.get("num_nodes", 1))


def first_validation_step(trainer: pl.Trainer, total_steps: int) -> int | None:
    """The optimizer step of this run's first validation, or None if it never validates by its last step.

    Lightning's validation schedule, re-derived (it has no public answer): `val_check_interval` as
    batches, or as a fraction of an epoch, counted within every `check_val_every_n_epoch`-th epoch,
    and batches made into optimizer steps. Time-based validation (a duration) counts as step 1.
    """
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


class StepBoundEpochDescription:
    """For Lightning's RichProgressBar: "Epoch 2" when a run is bounded by steps (max_epochs=-1),
    where Lightning's private `_get_train_description` writes "Epoch 2/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        return description.replace("/-2", "").rstrip() if self.trainer.max_epochs == -1 else description


class SameStreamDDPSetup:
    """For Lightning's DDPStrategy: DDP built on the stream that then trains.

    Lightning 2.6's private `_setup_model` wraps the model in DDP inside a fresh side stream (for
    capturing a whole DDP iteration as one CUDA graph, which lmlab never does: its graphed step is
    single-GPU). DDP keeps each parameter's gradient-accumulation node, and that node stays on the side
    stream, so from torch 2.10 on every backward hands every gradient across streams (torch warns "The
    AccumulateGrad node's stream does not match") and pays a synchronisation for it, in each
    micro-batch. Lightning has since made the same change (Lightning-AI/pytorch-lightning#21746).
    """

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)


class KeepFSDPRootAcrossStages:
    """For Lightning's FSDPStrategy: evaluation after fit on the same Trainer (train.py scores val/test).

    Lightning reconnects the bare LightningModule for each stage and, finding its blocks already
    wrapped, its private `_setup_model` leaves the root unwrapped, so the embeddings and head, still
    sharded, are called as they are. Here the model keeps its FSDP root from stage to stage, on its
    device: the private `_lightning_module` is hidden from the teardown, whose move to CPU would strand it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wrapped: nn.Module | None = None  # the FSDP root, once the first stage has wrapped the model

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        if self._wrapped is not None and self._wrapped.module is model:
            self.model = self._wrapped

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):  # wrapped by an earlier stage of this Trainer
            return model
        self._wrapped = super()._setup_model(model)
        return self._wrapped

    def teardown(self) -> None:
        module, self._lightning_module = self._lightning_module, None  # not moved to CPU: the next stage goes on
        try:
            super().teardown()
        finally:
            self._lightning_module = module


def saves_sharded(strategy: pl.strategies.FSDPStrategy) -> bool:
    """Whether an FSDP strategy writes sharded checkpoints (`state_dict_type="sharded"`, kept private)."""
    return strategy._state_dict_type == "sharded"

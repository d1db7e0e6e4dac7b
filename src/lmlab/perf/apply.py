"""The speed layer: `Perf` applied once, to the model and to the training step, the model file staying plain.

As torchtitan's `parallelize_llama(model, ...)`: the features that change the model (FP8 linear
layers, activation checkpointing) are applied to it in place, once, before the optimizer sees its
parameters; those that change how a step runs (compilation, the attention kernel, CUDA graphs,
Dynamo's DDP graph cuts) wrap the task's loss function or the fit, and the task only calls them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from lmlab.errors import ConfigError
from lmlab.graphed_step import GraphedTrainingStep, StepFunction, state_tensors
from lmlab.lightning_compat import uses_loss_scaler
from lmlab.models import LanguageModel, families
from lmlab.perf.attention import attention_context
from lmlab.perf.config import Perf
from lmlab.perf.float8 import use_float8_matmuls


def apply_perf(model: LanguageModel, perf: Perf) -> None:
    """FP8 matmuls and activation checkpointing, applied to `model` in place (the same parameter
    objects afterwards: decay groups, tying and checkpoint names are unchanged)."""
    if perf.activation_checkpointing and not model.block_types:
        stacks = ", ".join(f.name for f in families() if f.model.block_types)
        raise ConfigError(
            f"perf.activation_checkpointing=true needs a model made of repeated blocks ({stacks}); "
            f"{type(model).__name__} has none: set perf.activation_checkpointing=false"
        )
    # inside the model, around each block: the same under every strategy (FSDP's units are those blocks)
    model.activation_checkpointing = perf.activation_checkpointing
    if perf.float8:
        use_float8_matmuls(model)


def fast_loss(loss: Callable[..., Any], perf: Perf) -> Callable[..., Any]:
    """`loss` compiled as `perf` says. Model and loss are compiled together (the fp32 log-softmax over
    the vocabulary fuses into one kernel), as a function rather than a compiled module: checkpoints
    keep plain parameter names and generation keeps the eager model's free shapes."""
    return torch.compile(loss, mode=perf.compile_mode) if perf.compile else loss


def pinned_attention(perf: Perf) -> Callable[[torch.Tensor], contextlib.AbstractContextManager]:
    """The context that pins the attention kernel around a forward, given the batch's token ids."""
    return attention_context(perf.attention)


def dynamo_settings(perf: Perf, world_size: int) -> contextlib.AbstractContextManager:
    """Dynamo's DDP setting for the duration of a fit (restored after it), from `perf.compile_ddp`.

    split: Dynamo's DDPOptimizer cuts the compiled graph at DDP's gradient buckets so that each
    all-reduce overlaps the rest of the backward; whole: one graph, fused throughout, its gradients
    all-reduced after it (faster where the link is fast: docs/distributed.md)."""
    if not perf.compile or world_size == 1:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(optimize_ddp=perf.compile_ddp == "split")


def cuda_graph_obstacle(trainer: pl.Trainer, model: LanguageModel, perf: Perf, stateful: bool) -> str | None:
    """Why this run cannot replay its training step as a CUDA graph, or None if it can."""
    if trainer.strategy.root_device.type != "cuda":
        return "training does not run on a CUDA GPU"
    if trainer.world_size > 1:
        return "the run is distributed (CUDA graphs are used on one GPU: trainer.devices=1)"
    if trainer.accumulate_grad_batches > 1:
        return "gradients are accumulated over batches (trainer.accumulate_grad_batches > 1)"
    if uses_loss_scaler(trainer):
        return "fp16 loss scaling checks every step's gradients on the host (use bf16-mixed)"
    if model.has_data_dependent_shapes():
        return "the model's shapes depend on the data (mixture-of-experts routing)"
    if perf.graphs_by_compile:
        return f"torch.compile's mode {perf.compile_mode!r} captures CUDA graphs itself"
    if stateful and state_tensors(model.init_state(1, "meta")) is None:
        return "the model's recurrent state is not a tensor or tuple of tensors"
    return None


def training_graph(
    step: StepFunction, trainer: pl.Trainer, model: LanguageModel, perf: Perf, stateful: bool
) -> GraphedTrainingStep | None:
    """The graphed training step `perf.cuda_graphs` asks for, or None for the eager step; a run that
    insists (`true`) on a graph it cannot have gets a one-line error."""
    if perf.cuda_graphs is False:
        return None
    obstacle = cuda_graph_obstacle(trainer, model, perf, stateful)
    if obstacle is None:
        return GraphedTrainingStep(step, list(model.parameters()))
    if perf.cuda_graphs is True:
        raise ConfigError(f"perf.cuda_graphs=true cannot be used: {obstacle}; set perf.cuda_graphs=auto or false")
    return None

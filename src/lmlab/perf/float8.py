"""`perf.float8=true`: the linear layers' matmuls in FP8, through torchao's float8 training.

torchao swaps each `nn.Linear` for a `Float8Linear` that casts its input, weight and output gradient
to FP8 with a dynamic per-tensor scale for the three matmuls of forward and backward, and keeps the
weights, their gradients and everything outside the matmuls in the run's own precision. The
parameters are the same objects afterwards (tied embeddings stay tied) under the same names, so a
checkpoint loads into a plain model. FP8 tensor cores come with compute capability 8.9 (Ada, Hopper
and newer); a CPU emulates the products, more slowly than bf16, which is for checking, not speed.
torchao's layers fail under `torch.inference_mode`, so a float8 run evaluates under `no_grad`
(the Trainer's `inference_mode=False`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmlab.errors import ConfigError

FP8_CAPABILITY = (8, 9)


def use_float8_matmuls(model: nn.Module) -> int:
    """Swap the model's linear layers whose sizes FP8 kernels take (multiples of 16) for torchao's
    Float8Linear, in place; return how many were swapped."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError(
            "perf.float8=true needs torchao (pip install torchao, or pip install -e '.[fp8]'); or set perf.float8=false"
        ) from None

    def fits(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # look inside
        plain = type(module) is nn.Linear  # not one swapped already
        return plain and module.in_features % 16 == 0 and module.out_features % 16 == 0

    def plain_linears() -> int:
        return sum(type(m) is nn.Linear for m in model.modules())

    before = plain_linears()
    convert_to_float8_training(model, module_filter_fn=fits)
    return before - plain_linears()


def check_float8_device(device: torch.device) -> None:
    """A one-line error for a GPU without FP8 tensor cores; a warning on a CPU, which emulates them."""
    if device.type != "cuda":
        warnings.warn(
            f"perf.float8=true on {device.type}: the FP8 products are emulated, more slowly than bf16 "
            "(a check of the numbers, not a speed-up)",
            stacklevel=2,
        )
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"perf.float8=true needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
            f"{name} has {capability[0]}.{capability[1]}: set perf.float8=false"
        )

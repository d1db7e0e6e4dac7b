"""`task.float8=true`: the linear layers' matmuls in FP8, through torchao's float8 training.

torchao swaps each `nn.Linear` for a `Float8Linear` that casts its input, weight and output gradient
to FP8 with a dynamic per-tensor scale for the three matmuls of forward and backward, and keeps the
weights, their gradients and everything outside the matmuls in the run's own precision. The
parameters are the same objects afterwards (tied embeddings stay tied) under the same names, so a
checkpoint loads into a plain model. FP8 tensor cores come with compute capability 8.9 (Ada, Hopper
and newer). A CPU emulates the products, slowly, and torchao's layers do not run under a CPU's
autocast in inference mode (evaluation), so a run asks for such a GPU; the tests drive the model
directly on the CPU to check the numbers.
"""

from __future__ import annotations

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
            "task.float8=true needs torchao (pip install torchao, or pip install -e '.[fp8]'); or set task.float8=false"
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
    """A one-line error for a device without FP8 tensor cores."""
    if device.type != "cuda":
        raise ConfigError(
            f"task.float8=true trains on a CUDA GPU with FP8 tensor cores, not on {device.type}: set task.float8=false"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"task.float8=true needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
            f"{name} has {capability[0]}.{capability[1]}: set task.float8=false"
        )

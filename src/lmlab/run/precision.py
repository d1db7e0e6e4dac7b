"""`trainer.precision=auto`: bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere.

A CPU with AVX512-BF16 or AMX runs every family's training step 1.2-1.6x faster under bf16 autocast
than in fp32 (docs/benchmarks.md), with the weights, the optimizer state and the loss kept in fp32.
Without those instructions bf16 is emulated and slower, so fp32 stays. On a GPU, `auto` keeps fp32:
`trainer=gpu` chooses bf16 mixed precision there.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lmlab.errors import ConfigError

AUTO = "auto"
MATMUL_PRECISIONS = ("highest", "high", "medium")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 AVX512-BF16 or AMX tiles), as torch detects it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def planned_precision(trainer_cfg: DictConfig) -> str:
    """The precision the run trains in: `trainer.precision`, with `auto` replaced by the one this machine
    trains best in, so that config.yaml and the dashboards record what ran (lmlab.run.plan)."""
    if str(trainer_cfg.get("precision")) != AUTO:
        return trainer_cfg.get("precision")
    accelerator = str(trainer_cfg.get("accelerator", AUTO))
    on_cpu = accelerator == "cpu" or (accelerator == AUTO and not torch.cuda.is_available())
    return "bf16-mixed" if on_cpu and cpu_has_native_bf16() else "32-true"


def set_float32_matmul_precision(value: str) -> None:
    """How a GPU multiplies fp32 matrices, cuDNN's recurrent and convolution kernels included.

    `high` (the default) lets Ampere and newer GPUs use TF32 tensor cores: about 10 mantissa bits in
    the products, much faster. `highest` keeps IEEE fp32 throughout, the numerics of a paper from
    before TF32, for a recipe that reproduces one. torch's own switch covers matmuls only; cuDNN's
    RNNs follow `torch.backends.cudnn.allow_tf32`, so both are set together."""
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"float32_matmul_precision={value!r} is not one of {', '.join(MATMUL_PRECISIONS)}: "
            "highest is full fp32, high allows TF32 (the default)"
        )
    if torch.cuda.is_available():  # a CPU's fp32 products are left as they are
        torch.set_float32_matmul_precision(value)
        torch.backends.cudnn.allow_tf32 = value != "highest"

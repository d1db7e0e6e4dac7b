"""The FLOP rate that 100% model FLOPs utilisation (MFU) means: a card's dense bf16 tensor-core peak.

Datasheet figures without sparsity, matched against `torch.cuda.get_device_name()`, most specific name
first; an unlisted card (or a CPU) has no MFU unless its peak is given (`callbacks.throughput.peak_tflops`).
"""

from __future__ import annotations

import torch

BF16_DENSE_TFLOPS = {  # substring of the device name -> TFLOP/s
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM and NVL/HBM3 boards
    "H200": 989.0,
    "A100": 312.0,
}


def peak_flops(device: torch.device, tflops: float | None = None) -> float | None:
    """FLOP/s at 100% MFU on `device`: `tflops` when given, else the card's listed peak, else None."""
    if tflops is not None:
        if tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (got {tflops}): the card's dense bf16 TFLOP/s, e.g. 989")
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for card, t in BF16_DENSE_TFLOPS.items() if card in name), None)

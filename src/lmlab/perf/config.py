"""The speed switches of a run (`perf:` in conf/train.yaml): how fast it goes, never what it computes."""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.perf.attention import ATTENTION_BACKENDS

COMPILE_DDP = ("split", "whole")
GRAPHS_CAPTURED_BY_COMPILE = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


@dataclass(frozen=True)
class Perf:
    """Every speed feature in one place, checked once (lmlab.perf.apply applies them).

    compile: torch.compile the model and loss together; compile_mode: its mode (None: torch's default);
    compile_ddp: under DDP, cut the compiled graph at gradient buckets (split) or keep one (whole);
    float8: FP8 matmuls in the linear layers (torchao); attention: scaled_dot_product_attention's
    kernel; cuda_graphs: replay forward + backward as one CUDA graph on one GPU (auto: where possible);
    activation_checkpointing: recompute each block in the backward pass.
    """

    compile: bool = False
    compile_mode: str | None = None
    compile_ddp: str = "split"
    float8: bool = False
    attention: str = "auto"
    cuda_graphs: bool | str = "auto"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.compile_ddp not in COMPILE_DDP:
            raise ValueError(f"perf.compile_ddp must be split or whole (got {self.compile_ddp!r})")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"perf.attention must be one of {', '.join(ATTENTION_BACKENDS)} (got {self.attention!r})")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"perf.cuda_graphs must be auto, true or false (got {self.cuda_graphs!r})")

    @property
    def graphs_by_compile(self) -> bool:
        """Whether torch.compile captures CUDA graphs itself (then lmlab's own capture stays off)."""
        return self.compile and self.compile_mode in GRAPHS_CAPTURED_BY_COMPILE

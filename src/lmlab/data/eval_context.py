"""How much context each scored token gets: the evaluation protocol of `eval.context`.

Non-overlapping windows from a fresh state (`window`) give the first token of every window no
context at all, whatever the family, so they understate what a model can do. Papers score
differently: transformers with a sliding window (fairseq's `--context-window`), recurrent nets with
their state carried over the whole split (Zaremba et al.). `full` picks the better of the two that
the model allows. Every score records the protocol that produced it, so runs scored differently are
never ranked side by side by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import ConfigError

EVAL_CONTEXTS = ("window", "sliding", "carry", "full")


@dataclass(frozen=True)
class EvalProtocol:
    """A resolved protocol: windows of `stride` new targets each, or one carried state per stream."""

    mode: str  # window, sliding or carry
    stride: int | None = None  # sliding: new targets per window (block_size - stride tokens of context)

    @property
    def label(self) -> str:
        """What metrics.json and the reports record, e.g. `sliding/64`."""
        return f"sliding/{self.stride}" if self.mode == "sliding" else self.mode

    @property
    def carries_state(self) -> bool:
        return self.mode == "carry"


def resolve_eval_protocol(
    context: str | None, stride: int | None, block_size: int, carries_state: bool, stateful: bool = False
) -> EvalProtocol:
    """`eval.context` and `eval.stride` checked against the model; `full` becomes `carry` for a model
    whose fixed-size state can run over a whole split, else `sliding`; unset, it is `carry` for a
    stateful run (data.stateful) and `window` otherwise, as evaluation always was."""
    if context is None:  # a stateful run of an attention model is refused by its own check, later
        context = "carry" if stateful and carries_state else "window"
    if context not in EVAL_CONTEXTS:
        raise ConfigError(f"eval.context must be one of {', '.join(EVAL_CONTEXTS)} (got {context!r})")
    if context == "full":
        context = "carry" if carries_state else "sliding"
    if context == "carry":
        if not carries_state:
            raise ConfigError(
                "eval.context=carry carries the model's state across the whole split, and this model's state "
                "is an attention cache that grows with it: use eval.context=sliding (or full) for attention models"
            )
        return EvalProtocol("carry")
    if context == "window":
        return EvalProtocol("window", block_size)
    stride = block_size // 2 if stride is None else int(stride)
    if not 1 <= stride < block_size:
        raise ConfigError(
            f"eval.stride={stride} must be at least 1 and below data.block_size={block_size} "
            f"(each window scores its last eval.stride tokens): set eval.stride to e.g. {max(1, block_size // 2)}"
        )
    return EvalProtocol("sliding", stride)

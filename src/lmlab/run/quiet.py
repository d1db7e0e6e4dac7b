"""A quiet terminal: lmlab's own lines, the progress bar and real warnings, without Lightning's start-up chatter.

Lightning reports its setup ("GPU available: False", "`Trainer(limit_val_batches=1.0)` was configured
so 100% ...", a tip to install litlogger, "`Trainer.fit` stopped: `max_steps=...` reached") as info
messages on its rank-zero loggers, and the installed torch warns about Lightning's own use of a
deprecated pytree class (and, compiling, about lmlab's own activation checkpoints). None of it says
anything a user can act on. Warnings about the run itself
(Lightning's rank_zero_warn, PyTorch's, lmlab's) go through `warnings` and stay visible.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_INFO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
# Lightning's pytree helper, on torch >= 2.9: a deprecation inside a library, not a problem of the run.
LIBRARY_DEPRECATIONS = (r".*`isinstance\(treespec, LeafSpec\)` is deprecated", r".*LeafSpec.* is deprecated")
# Under DDP Lightning suggests sync_dist=True for every epoch-level metric; lmlab's evaluation sums are
# torchmetrics SumMetrics, which already all-reduce, so the advice does not apply.
ADVICE = (r".*It is recommended to use `self\.log\(.*sync_dist=True\)`",)
# torch.compile notes once that a checkpoint carries a context_fn and warns of in-place ops: lmlab's own
# (perf.activation_checkpointing), which recomputes every op when compiled, so nothing is cached to mutate.
TORCH_NOTES = ("torch._higher_order_ops.wrap",)


def quiet_lightning(verbose: bool = False) -> None:
    """Hide Lightning's informational start-up lines and library-internal deprecations (`verbose=true`
    shows them again). Call once, before the Trainer is built."""
    level = logging.INFO if verbose else logging.WARNING
    for name in LIGHTNING_INFO_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in TORCH_NOTES:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        for message in (*LIBRARY_DEPRECATIONS, *ADVICE):
            warnings.filterwarnings("ignore", message=message)

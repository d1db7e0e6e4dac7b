"""Ctrl-C and SIGTERM outside the training loop: a one-line stop, never a traceback.

During training `lmlab.callbacks.CheckpointOnInterrupt` saves a resumable checkpoint at the next step.
Before it (hashing, tokenizing and caching the corpus, building the model) and after it (the final
validation and test on the best checkpoint, the sample) there is no step to finish: a signal stops
the run at once with `RunInterrupted`. Nothing half-written is trusted later: the token cache is built
in a temporary folder, every other file is replaced whole, and checkpoints already written stay.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmlab.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(run_dir: str | Path) -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise RunInterrupted (the training loop's own handler takes over
    while it runs, and gives these back when it ends). The previous handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return
    previous: dict[int, Any] = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def stop(signum: int, frame: Any) -> None:
        raise RunInterrupted(
            f"{signal.Signals(signum).name} outside the training steps: stopped, keeping the checkpoints written "
            f"so far; go on by running the same command with hydra.run.dir={run_dir}"
        )

    for signum in SIGNALS:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

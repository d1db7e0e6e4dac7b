"""Callbacks lmlab adds to Lightning's own (checkpointing, LR monitor and the rich progress bar).

The last two keep long runs safe: one stops a diverged run before it overwrites a good checkpoint,
the other turns Ctrl-C or SIGTERM into a resumable checkpoint.
"""

from __future__ import annotations

import csv
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.utilities import move_data_to_device

from lmlab.checkpoint import SECTION
from lmlab.errors import ConfigError, DivergedError, RunInterrupted
from lmlab.fsdp import full_weights, uses_fsdp
from lmlab.generate import SamplingConfig, sample_text
from lmlab.lightning_compat import StepBoundEpochDescription
from lmlab.models import state_from_data, state_to_data
from lmlab.perf.peak import peak_flops
from lmlab.report.blocks import write_test_blocks


class SyncFreeProgressBar(StepBoundEpochDescription, RichProgressBar):
    """Lightning's rich progress bar, compact and cheap: loss, val bpb and tokens/s, on one 80-column line.

    Metrics logged with `prog_bar=True` are turned into Python floats by Lightning after every
    batch: a host-device sync per step that stalls a GPU. lmlab logs nothing to the bar; this bar
    reads `show` (metric -> label) from the callback metrics every `metrics_every_n_steps` steps and
    after each validation. It redraws `refresh_rate` times a second (Lightning's default of 100
    costs a small model's steps a rendering thread); everything else is in TensorBoard.
    """

    SHOW = {"train/loss": "loss", "val/bpb": "val bpb", "train/tokens_per_s": "tok/s"}

    def __init__(
        self,
        metrics_every_n_steps: int = 10,
        show: Mapping[str, str] | None = None,
        refresh_rate: int = 10,
        **kwargs,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics_every_n_steps, self.show = metrics_every_n_steps, dict(self.SHOW if show is None else show)
        self._shown: dict[str, str] = {}
        self._read_at = -1

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        due = trainer.global_step % self.metrics_every_n_steps == 0 and trainer.global_step != self._read_at
        if due or not trainer.training or not self._shown:
            self._read_at = trainer.global_step
            logged = trainer.callback_metrics
            self._shown = {label: _compact(float(logged[key])) for key, label in self.show.items() if key in logged}
        return self._shown

    def configure_columns(self, trainer) -> list:
        """Description, a short bar, steps done, time left: the metrics keep the rest of an 80-column line."""
        from pytorch_lightning.callbacks.progress.rich_progress import BatchesProcessedColumn, CustomBarColumn
        from rich.progress import TextColumn, TimeRemainingColumn

        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(
                bar_width=12,
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            TimeRemainingColumn(compact=True),
        ]


def _compact(value: float) -> str:
    """4 significant digits, then 12.3k / 4.56M: a metric in at most 6 characters."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.4g}"


class TokenThroughput(pl.Callback):
    """Training tokens per second, shown in the progress bar and logged as `train/tokens_per_s`, and
    model FLOPs utilisation as `train/mfu`: tokens/s x the model's training FLOPs per token (6N plus
    its sequence mixing, LanguageModel.flops_per_token) over the card's peak (lmlab.perf.peak; on an
    unlisted card or a CPU only when `peak_tflops` gives it), summed over every process.

    Measured over `every_n_steps` optimizer steps, so reading the clock never forces a device sync
    inside a step.
    """

    def __init__(self, every_n_steps: int = 10, peak_tflops: float | None = None) -> None:
        self.every_n_steps, self.peak_tflops = every_n_steps, peak_tflops
        self._start: float | None = None
        self._tokens = 0
        self._peak: float | None = None
        self._flops_per_token: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        try:
            self._peak = peak_flops(trainer.strategy.root_device, self.peak_tflops)
        except ValueError as err:
            raise ConfigError(f"callbacks.throughput.{err}") from None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start, self._tokens = time.perf_counter(), 0
        if self._peak is not None and self._flops_per_token is None:
            self._flops_per_token = pl_module.model.flops_per_token(batch[1].size(1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch[1].numel() * trainer.world_size
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            tokens_per_s = self._tokens / max(time.perf_counter() - self._start, 1e-9)
            log = functools.partial(pl_module.log, on_step=True, on_epoch=False, rank_zero_only=True)
            log("train/tokens_per_s", tokens_per_s)
            if self._peak is not None:
                log("train/mfu", tokens_per_s * self._flops_per_token / (self._peak * trainer.world_size))
            self._start, self._tokens = time.perf_counter(), 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = None  # evaluation time is not training throughput


class NonFiniteLossGuard(pl.Callback):
    """Stops training at the first NaN or infinite loss, before a checkpoint can keep the bad weights.

    Losses stay on the device and are read every `check_every_n_steps` steps, so a GPU never waits
    for the host at each step, yet the error names the first bad step. Every checkpoint save checks
    the pending losses and the weights themselves first, so `last.ckpt` always holds the last finite
    state and a resume starts from it.
    """

    def __init__(self, check_every_n_steps: int = 10) -> None:
        if check_every_n_steps < 1:
            raise ConfigError(f"callbacks.nan_guard.check_every_n_steps must be >= 1 (got {check_every_n_steps})")
        self.check_every_n_steps = check_every_n_steps
        self._pending: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return
        self._pending.append((trainer.global_step, loss.detach()))
        if len(self._pending) >= self.check_every_n_steps:
            self._check_losses(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check_losses(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check_losses(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._check_losses(trainer)
        bad = next((name for name, tensor in checkpoint.get("state_dict", {}).items() if not _finite(tensor)), None)
        # under FSDP each rank checks only its own shards: every rank stops, or none (saving is collective)
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            bad = bad or "a shard held by another rank"
        if bad is not None:
            raise DivergedError(
                f"the weights became NaN or infinite by step {trainer.global_step} ({bad}); {self._advice(trainer)}"
            )

    def _check_losses(self, trainer) -> None:
        if not self._pending:
            return
        steps, losses = zip(*self._pending)
        self._pending.clear()
        finite = torch.isfinite(torch.stack(losses).float()).tolist()
        if not all(finite):
            first = finite.index(False)
            raise DivergedError(
                f"the training loss became {float(losses[first])} at step {steps[first]}; {self._advice(trainer)}"
            )

    @staticmethod
    def _advice(trainer) -> str:
        last = last_checkpoint_path(trainer)
        kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was saved"
        return f"{kept}; lower optimizer.lr or raise scheduler.warmup_steps, then resume from it or start again"


def _finite(tensor: torch.Tensor) -> bool:
    """Whether a saved tensor holds no NaN or inf; a sharded one (FSDP) is checked on this rank's shard."""
    local = tensor.local_tensor() if hasattr(tensor, "local_tensor") else tensor  # ShardedTensor
    local = local.to_local() if hasattr(local, "to_local") else local  # DTensor
    return not local.is_floating_point() or bool(torch.isfinite(local).all())


class CheckpointOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM: finish the current step, write a resumable last.ckpt, stop with a one-line error.

    The signal only raises a flag and the checkpoint is written at the next optimizer-step boundary,
    so it never holds half an update (a KeyboardInterrupt can land anywhere). A second signal
    stops at once, as Ctrl-C usually does. Handlers are installed only from the main thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._received: str | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._received, self._last_step = None, trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            for signum in self.SIGNALS:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._received is not None:
            self._restore()
            raise KeyboardInterrupt
        self._received = signal.Signals(signum).name
        print(
            f"\n{self._received} received: stopping after this step with a checkpoint "
            "(send it again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        stop = self._received is not None
        if trainer.world_size > 1:  # every rank must stop at the same step: saving is collective
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not (stop and stepped):
            return
        path = self._save_last(trainer)
        raise RunInterrupted(
            f"{self._received or 'a signal'} at step {trainer.global_step}: saved {path}; "
            f"resume by running the same command with ckpt_path={path}"
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @staticmethod
    def _save_last(trainer) -> str:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        return path


def last_checkpoint_path(trainer: pl.Trainer) -> str:
    """Where the run keeps its newest state: the file of the checkpoint callback that monitors nothing
    (conf/callbacks: last_checkpoint), else `checkpoints/last.ckpt` in the run directory."""
    for callback in trainer.checkpoint_callbacks:
        if (
            isinstance(callback, ModelCheckpoint)
            and callback.monitor is None
            and callback.dirpath
            and callback.filename
        ):
            return os.path.join(callback.dirpath, callback.filename + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


class ValidationCurve(pl.Callback):
    """Appends each validation result of training to a CSV in the run directory, against text read.

    Sweep reports draw learning curves from it (val bits per byte against training bytes seen)
    without parsing TensorBoard event files, whose layout belongs to TensorBoard. One appended line
    per validation: a run killed mid-write loses at most its last point, and readers skip it.
    """

    FIELDS = ("step", "tokens_seen", "bytes_seen", "train_flops", "time_s", "val/loss", "val/ppl", "val/bpb")
    SCORES = ("val/loss", "val/ppl", "val/bpb")

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._started = time.perf_counter()
        self._flops_per_token = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        self._flops_per_token = pl_module.model.flops_per_token(trainer.datamodule.block_size)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        scores = trainer.callback_metrics
        tokens = pl_module.tokens_seen * trainer.world_size
        values = {
            "step": trainer.global_step,
            "tokens_seen": tokens,
            "bytes_seen": round(tokens * trainer.datamodule.train_bytes_per_token),
            "train_flops": tokens * self._flops_per_token,  # cumulative training FLOPs (lmlab.run.budgets)
            "time_s": round(time.perf_counter() - self._started, 2),
            **{key: f"{float(scores[key]):.6g}" for key in self.SCORES},
        }
        fields = self._header()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if fields is None:
                fields = self.FIELDS
                writer.writerow(fields)
            writer.writerow([values.get(key, "") for key in fields])

    def _header(self) -> tuple[str, ...] | None:
        """The columns of the file already there (a resumed run keeps an older run's layout), or None."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with self.path.open(newline="") as f:
            return tuple(next(csv.reader(f), ())) or None


class ValidationSample(pl.Callback):
    """After each validation during training, a short seeded sample from a fixed prompt, logged to
    TensorBoard's Text tab as `val/sample`: how the model writes is seen to improve step by step.

    The same prompt and seed each time, so successive samples differ only by what the model learnt.
    Sampling uses its own generator, so it never changes the training run's random stream.
    Under FSDP each rank holds a shard of the weights and gathering them is collective, so every rank
    samples with the full weights (lmlab.fsdp.full_weights) and global rank 0 logs.
    """

    def __init__(self, sample: Any, max_new_tokens: int = 120) -> None:
        """`sample`: the run's sampling node (prompt, temperature, ...); samples here are `max_new_tokens` long."""
        self.sampling = SamplingConfig.from_config(sample, max_new_tokens=max_new_tokens)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        sharded = uses_fsdp(trainer.strategy)
        if not (sharded or trainer.is_global_zero):
            return
        with full_weights(trainer):
            text = sample_text(pl_module.model, trainer.datamodule.tokenizer, self.sampling)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("val/sample", f"```\n{text}\n```", global_step=trainer.global_step)


class SelfContainedCheckpoints(pl.Callback):
    """Adds the run's record (model config, tokenizer, settings; lmlab.checkpoint.run_record) to every
    checkpoint, so that one file is enough to generate, evaluate, resume or fine-tune."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[SECTION] = {**self.record, "step": trainer.global_step, "tokens_seen": pl_module.tokens_seen}


class ExactResume(pl.Callback):
    """What Lightning does not restore on a resume, kept in every checkpoint: the recurrent state the
    task carries into the next batch (`carried_state`, one per rank under DDP: each rank carries the
    state of its own streams) and the RNG that draws the next dropout masks. train.py adds it to every run."""

    def __init__(self) -> None:
        self._resumed_rng: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["carried_state"] = state_to_data(pl_module.carried_state)
        if trainer.world_size > 1:
            every = [None] * trainer.world_size
            torch.distributed.all_gather_object(
                every, move_data_to_device(state_to_data(pl_module.carried_state), "cpu")
            )
            checkpoint["carried_state_by_rank"] = every
        checkpoint["rng_states"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        pl_module.carried_state = state_from_data(checkpoint.get("carried_state"))
        by_rank = checkpoint.get("carried_state_by_rank")
        if by_rank is not None:
            if len(by_rank) != trainer.world_size:
                raise ConfigError(
                    f"this stateful checkpoint was saved by {len(by_rank)} processes: "
                    f"resume it with trainer.devices={len(by_rank)}"
                )
            pl_module.carried_state = state_from_data(by_rank[trainer.global_rank])
        self._resumed_rng = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        # Applied here, after Lightning's own setup has drawn from the RNG, so that the first
        # resumed step sees the state the interrupted run's next step would have seen.
        if self._resumed_rng is not None:
            torch.set_rng_state(self._resumed_rng["cpu"])
            if len(self._resumed_rng["cuda"]) == torch.cuda.device_count() > 0:
                torch.cuda.set_rng_state_all(self._resumed_rng["cuda"])
            self._resumed_rng = None
        if pl_module.carried_state is not None:
            pl_module.carried_state = move_data_to_device(pl_module.carried_state, pl_module.device)


class SaveTestBlocks(pl.Callback):
    """After the test pass, the test split's nats per block of its text, in `<run dir>/test_blocks.npz`:
    what `lmlab.report.bootstrap` resamples to say whether two runs' test bits per byte really differ.

    Blocks are cut from the raw test text (lmlab.report.blocks), not from tokens, so runs with any
    tokenizer on the same text share one layout and pair block by block. Under DDP every rank's
    per-token nats are gathered in rank order (each rank holds a contiguous share of the split) and
    global rank 0 writes the file. A partial test pass (limit_test_batches) writes nothing.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        chunks = getattr(pl_module, "test_token_nats", None)
        if not chunks:
            return
        datamodule = trainer.datamodule
        nats = _gather_in_rank_order(trainer, in_text_order(chunks, datamodule.eval_streams))
        if trainer.is_global_zero:
            write_test_blocks(self.path, nats[nats >= 0].double().cpu().numpy(), datamodule)


def in_text_order(chunks: list[torch.Tensor], stateful: bool) -> torch.Tensor:
    """One rank's per-target values of its evaluation batches, flattened in the order of the text.

    Window batches are consecutive windows. Stateful batch k holds window k of every stream, so a
    stream is one column of the stacked batches, and the streams follow each other in the text.
    """
    return torch.stack(chunks).transpose(0, 1).flatten() if stateful else torch.cat(chunks).flatten()


def _gather_in_rank_order(trainer, local: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor, concatenated in rank order (padded with -1 to a common length to gather)."""
    if trainer.world_size == 1:
        return local
    lengths = trainer.strategy.all_gather(torch.tensor([local.numel()], device=local.device)).flatten()
    padded = torch.nn.functional.pad(local, (0, int(lengths.max()) - local.numel()), value=-1.0)
    return trainer.strategy.all_gather(padded).flatten()


class CpuThreads(pl.Callback):
    """Pins the number of threads PyTorch's CPU kernels use (`torch.set_num_threads`) when training starts.

    Small recurrent models run a long chain of tiny matmuls: several threads per op add
    synchronisation, and once other jobs share the cores OpenMP's spinning threads make a step's time
    swing tenfold. One thread per run keeps CPU timings stable and comparable (docs/comparisons.md).
    """

    def __init__(self, num_threads: int) -> None:
        if num_threads < 1:
            raise ConfigError(f"callbacks.cpu_threads.num_threads must be >= 1 (got {num_threads})")
        self.num_threads = num_threads

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.num_threads)

"""A training run from a composed config: build -> fit -> score val/test on the best checkpoint -> write.

`train.py` at the repository root is the Hydra entry point; this module holds the work so that tests
can call `train(cfg)` on a config from Hydra's `compose()`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lmlab.callbacks import ExactResume, SelfContainedCheckpoints
from lmlab.checkpoint import run_record
from lmlab.checkpoint.format import checkpoint_step
from lmlab.checkpoint.resume import continue_unfinished_run, start_from_checkpoint
from lmlab.data import TextDataModule
from lmlab.data.eval_context import EvalProtocol, resolve_eval_protocol
from lmlab.errors import ConfigError, LmlabError, RunInterrupted, RunStopped
from lmlab.fsdp import full_weights
from lmlab.generate import SamplingConfig, sample_text
from lmlab.io import atomic_write_json, atomic_write_text
from lmlab.metrics import bits_per_byte
from lmlab.models import LanguageModel
from lmlab.models.registry import model_class
from lmlab.perf import Perf, apply_perf, dynamo_settings
from lmlab.perf.float8 import check_float8_device
from lmlab.report.terminal import print_summary
from lmlab.run.budgets import byte_budget, flops_budget
from lmlab.run.build import build
from lmlab.run.checks import (
    check_context_fits,
    check_optimizer,
    check_output_paths,
    check_run_settings,
    check_stateful,
    check_training_length,
)
from lmlab.run.dashboards import log_final, log_run_info
from lmlab.run.dirs import RunDirLock
from lmlab.run.distributed import check_distributed
from lmlab.run.evaluate import total_nats
from lmlab.run.loggers import build_loggers
from lmlab.run.plan import resolve_run
from lmlab.run.precision import set_float32_matmul_precision
from lmlab.run.quiet import quiet_lightning
from lmlab.run.signals import stop_on_signals
from lmlab.run.sweep_resume import continue_job
from lmlab.task import LanguageModelTask

log = logging.getLogger(__name__)

VAL_METRICS = ("val/loss", "val/ppl", "val/bpb", "val/unk_rate")


def run_job(cfg: DictConfig) -> float:
    """One job of `train.py`: its val/bpb, what an Optuna sweep minimises.

    Alone, a user error propagates (the entry point prints it in one line). In a sweep, a failed job
    is recorded in its metrics.json and the sweep goes on; Ctrl-C or SIGTERM stops the whole sweep.
    """
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return train(cfg)["val/bpb"]
    try:
        earlier = continue_job(cfg)  # a rerun of the sweep reuses what this job completed
        return (earlier or train(cfg))["val/bpb"]
    except LmlabError as err:
        print(f"error: {err}", file=sys.stderr)
        record_failure(cfg, err)
        if isinstance(err, RunInterrupted):
            sys.exit(130)
    except Exception as err:
        log.exception("this job crashed; the sweep goes on")  # the traceback, in the job's log file
        record_failure(cfg, err)
    return float("inf")  # the worst val/bpb: an Optuna search steers away from settings that fail


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment and return its metrics (also written to `<run dir>/metrics.json`).

    The run directory is locked for the run's lifetime (one writer); a run that stops early
    (diverged, interrupted, disk full) records why in its metrics.json."""
    with stop_on_signals(cfg.paths.output_dir), RunDirLock() as lock:
        try:
            return _train(cfg, lock)
        except RunStopped as err:
            if lock.held:
                record_failure(cfg, err)
            raise


def _train(cfg: DictConfig, lock: RunDirLock) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()  # CPU time: this process, all its threads
    quiet_lightning(bool(cfg.get("verbose", False)))
    cfg = continue_unfinished_run(cfg)  # never on top of another run's results
    cfg, start = start_from_checkpoint(cfg)  # resume (ckpt_path=) or fine-tune (init_from=), else (cfg, None)
    check_run_settings(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    check_training_length(cfg.trainer)
    perf: Perf = build(cfg.perf, "perf")  # checked before the data is prepared, not at the first step
    if perf.float8:
        on_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu"
        check_float8_device(torch.device("cuda" if on_gpu else "cpu"))
    sampling = SamplingConfig.from_config(cfg.sample)  # checked now rather than after the training
    byte_budget(cfg)  # both checked before the data is prepared; the plan turns them into steps
    flops_budget(cfg)
    output_dir = Path(cfg.paths.output_dir)
    lock.acquire(output_dir)  # creates it; a second process on the same directory is refused

    tokenizer = start.tokenizer if start else build(cfg.tokenizer, "tokenizer")  # a checkpoint's is reused
    protocol = eval_protocol(cfg)  # eval.context, checked against the model family before any work
    datamodule: TextDataModule = build(
        cfg.data, "data", tokenizer=tokenizer, seed=cfg.seed, eval_context=protocol.mode, eval_stride=protocol.stride
    )
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer
    tokenizer.save(output_dir / "tokenizer.json")

    cfg = resolve_run(cfg, datamodule)  # precision, matched width, step budget: settled once, then only read
    model = build(cfg.model, "model", vocab_size=tokenizer.vocab_size)
    check_context_fits(model, datamodule.block_size)
    check_stateful(model, datamodule.stateful)
    check_distributed(cfg, model)  # FSDP for a recurrent model, a SLURM launcher at odds with the Trainer
    if start:
        start.load_into(model)
    apply_perf(model, perf)  # FP8 layers and activation checkpointing, once, before the optimizer sees the weights
    callbacks = {name: build(node, f"callbacks.{name}") for name, node in cfg.get("callbacks", {}).items()}
    loggers = build_loggers(cfg)  # names a sweep's experiment and its runs
    # torchao's FP8 layers fail under inference_mode: a float8 run evaluates under no_grad instead
    no_inference_mode = {"inference_mode": False} if perf.float8 else {}
    run_callbacks = [SelfContainedCheckpoints(run_record(cfg, tokenizer)), ExactResume()]
    trainer: pl.Trainer = build(
        cfg.trainer, "trainer", callbacks=[*callbacks.values(), *run_callbacks], logger=loggers, **no_inference_mode
    )
    task: LanguageModelTask = build(  # its perf: the same node, for the step
        cfg.task, "task", model=model, eval_carries_state=protocol.carries_state
    )
    check_optimizer(task.optimizer_factory)
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # rebuilds exactly this run

    check_output_paths(output_dir, callbacks, trainer.loggers)
    if trainer.is_global_zero:
        log_run_info(trainer, output_dir, cfg.seed, datamodule.corpus.corpus_sha256, start)
    try:
        with dynamo_settings(perf, trainer.world_size):
            trainer.fit(
                task, datamodule=datamodule, ckpt_path=start.path if start and start.resume else None, weights_only=True
            )
    except MisconfigurationException as err:  # Lightning's own check of the trainer, callbacks and loggers
        raise ConfigError(
            f"Lightning refused this setup: {' '.join(str(err).split())} "
            "Change the trainer/callbacks/logger settings it names."
        ) from None
    # before the best checkpoint's step and count are loaded back
    steps, tokens_seen = trainer.global_step, task.tokens_seen * trainer.world_size
    scores = _final_scores(trainer, task, datamodule)
    with full_weights(trainer):  # FSDP: every rank gathers the full weights and samples (collective)
        sample = sample_text(task.model, tokenizer, sampling)
        if cfg.get("eval", {}).get("also_full") and protocol != full_protocol(cfg, datamodule.block_size):
            scores["test_full/bpb"] = full_context_test_bpb(
                task.model, datamodule, full_protocol(cfg, datamodule.block_size)
            )

    metrics: dict[str, Any] = {
        "model": cfg.names.model,
        "tokenizer": cfg.names.tokenizer,
        "data": datamodule.name,
        "eval_context": protocol.label,  # how val/* and test/* were scored (eval.context)
        **{key: scores[key] for key in sorted(scores) if "/" in key},
        "best_step": scores["best_step"],
        "params": task.num_parameters,
        "vocab_size": tokenizer.vocab_size,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "bytes_seen": round(tokens_seen * datamodule.train_bytes_per_token),
        "flops_per_token": model.flops_per_token(datamodule.block_size),
        "train_flops": tokens_seen * model.flops_per_token(datamodule.block_size),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "cpu_time_s": round(time.process_time() - cpu_started, 2),
        "torch_threads": torch.get_num_threads(),
        "status": "completed",
    }
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "sample.txt", sample)
        atomic_write_json(output_dir / "metrics.json", metrics)
        log_final(trainer, cfg, metrics, sample)
        print_summary(metrics, sample)
    return metrics


def eval_protocol(cfg: DictConfig) -> EvalProtocol:
    """`eval.context` resolved for this run's model family (its class declares `carries_state`)."""
    node = cfg.get("eval") or {}
    return resolve_eval_protocol(
        node.get("context"), node.get("stride"), int(cfg.data.block_size), _carries_state(cfg), bool(cfg.data.stateful)
    )


def full_protocol(cfg: DictConfig, block_size: int) -> EvalProtocol:
    """`eval.context=full` for this run's model: carry where its state allows, else sliding."""
    return resolve_eval_protocol("full", (cfg.get("eval") or {}).get("stride"), block_size, _carries_state(cfg))


def _carries_state(cfg: DictConfig) -> bool:
    model = model_class(str(cfg.model._target_)) or get_class(str(cfg.model._target_))
    return bool(getattr(model, "carries_state", False))


def full_context_test_bpb(model: LanguageModel, datamodule: TextDataModule, protocol: EvalProtocol) -> float:
    """Test bits per byte with full context (eval.also_full): the comparison recipes' extra column."""
    corpus = datamodule.corpus
    nats = total_nats(
        model,
        corpus.ids["test"],
        int(corpus.ids["val"][-1]),
        block_size=datamodule.block_size,
        batch_size=datamodule.eval_batch_size,
        stateful=protocol.carries_state,
        stride=protocol.stride,
    )
    return bits_per_byte(nats, corpus.split_bytes["test"])


def _final_scores(trainer: pl.Trainer, task: LanguageModelTask, datamodule: TextDataModule) -> dict[str, float]:
    """Validation and test on the best checkpoint by val/bpb (the last weights if none was saved).

    When the best checkpoint is the final step and the last validation scored it, the weights in
    memory are that checkpoint and its validation scores are at hand: only the test pass runs.
    """
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    # mmap: only the step is read here, not the weights and optimizer state
    best_step = checkpoint_step(best) if best else trainer.global_step  # a file, or a sharded folder (FSDP)
    scored = trainer.callback_metrics
    if not (best_step == trainer.global_step and all(key in scored for key in VAL_METRICS)):
        trainer.validate(task, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    scores = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    best_or_current = None if best_step == trainer.global_step else best
    trainer.test(task, datamodule=datamodule, ckpt_path=best_or_current, verbose=False, weights_only=True)
    scores.update({key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")})
    scores["best_step"] = best_step
    return scores


def record_failure(cfg: DictConfig, err: Exception) -> dict[str, Any]:
    """Write a failed job's metrics.json (its status and one-line error), so a sweep's report lists it with the rest."""
    lines = str(err).strip().splitlines()
    error = lines[0] if lines else ""
    if not isinstance(err, LmlabError):
        error = f"{type(err).__name__}: {error}" if error else type(err).__name__
    metrics = {
        "model": cfg.names.model,
        "tokenizer": cfg.names.tokenizer,
        "data": cfg.names.data,
        "status": getattr(err, "status", "failed"),
        "error": error,
    }
    try:
        atomic_write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    except (OSError, LmlabError) as write_err:  # a full disk: the error itself still reaches the user
        log.warning("could not record the failure in metrics.json: %s", write_err)
    return metrics

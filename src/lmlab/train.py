"""A training run from a composed config: build, fit, score val/test on the best checkpoint, report.

`train.py` at the repository root is the Hydra entry point; this module holds the work so that tests
can call `train(cfg)` on a config from Hydra's `compose()`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lmlab.budget import apply_byte_budget, pop_byte_budget
from lmlab.checkpoint import run_record
from lmlab.config import build, dashboard_hparams
from lmlab.data import TextDataModule
from lmlab.errors import ConfigError, LmlabError, RunStopped
from lmlab.generation import check_sampling
from lmlab.io import atomic_write_json, atomic_write_text
from lmlab.reliability import (
    check_context_fits,
    check_optimization,
    check_output_paths,
    check_training_length,
    continue_unfinished_run,
)
from lmlab.resume import start_from_checkpoint
from lmlab.run_info import as_markdown, collect_run_info, merge_with_earlier
from lmlab.sizing import apply_target_params
from lmlab.summary import print_summary
from lmlab.task import LanguageModelTask
from lmlab.text_generation import sample_text

VAL_METRICS = ("val/loss", "val/ppl", "val/bpb", "val/unk_rate")


def _final_metrics(trainer: pl.Trainer, task: LanguageModelTask, datamodule: TextDataModule) -> dict[str, float]:
    """Validation and test on the best checkpoint by val/bpb (the last weights if none was saved).

    When the best checkpoint is the final step and the last validation scored it, the weights in
    memory are that checkpoint and its validation scores are at hand: only the test pass runs.
    """
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    # mmap: only the step is read here, not the weights and optimizer state
    best_step = (
        int(torch.load(best, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        if best
        else trainer.global_step
    )
    scored = trainer.callback_metrics
    if best_step == trainer.global_step and all(key in scored for key in VAL_METRICS):
        scores = {key: float(scored[key]) for key in VAL_METRICS}
        best = None
    else:
        scores = {
            key: float(value)
            for key, value in trainer.validate(task, datamodule=datamodule, ckpt_path=best, verbose=False)[0].items()
        }
    scores.update(
        {
            key: float(value)
            for key, value in trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False)[0].items()
        }
    )
    scores["best_step"] = best_step
    return scores


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment and return its metrics (also written to `<run dir>/metrics.json`)."""
    started = time.perf_counter()
    cfg = continue_unfinished_run(cfg)  # never on top of another run's results
    cfg, start = start_from_checkpoint(cfg)  # resume (ckpt_path=) or fine-tune (init_from=), else (cfg, None)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    check_training_length(cfg.trainer)
    # the end-of-run sample's settings, checked now rather than after the training they would crash
    check_sampling(max_new_tokens=cfg.sample.max_new_tokens, temperature=cfg.sample.temperature, top_k=cfg.sample.top_k)
    max_bytes = pop_byte_budget(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    tokenizer = (
        start.tokenizer if start else build(cfg.tokenizer, "tokenizer")
    )  # a checkpoint's is reused, not retrained
    datamodule: TextDataModule = build(cfg.data, "data", tokenizer=tokenizer, seed=cfg.seed)
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer
    tokenizer.save(output_dir / "tokenizer.json")

    apply_target_params(cfg.model, tokenizer.vocab_size)
    model = build(cfg.model, "model", vocab_size=tokenizer.vocab_size)
    check_context_fits(model, datamodule.block_size)
    if start:
        start.load_into(model)
    task = LanguageModelTask(
        model,
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        label_smoothing=cfg.label_smoothing,
        stateful=cfg.data.stateful,
        compile=cfg.compile,
    )
    check_optimization(task.optimizer_factory, task.label_smoothing)
    callbacks = [build(node, f"callbacks.{name}") for name, node in cfg.get("callbacks", {}).items()]
    loggers = [build(node, f"logger.{name}") for name, node in cfg.get("logger", {}).items()]
    trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers)
    if max_bytes is not None:
        apply_byte_budget(trainer, cfg, datamodule, max_bytes)
    # again, as built (matched width, step budget), so it rebuilds exactly this run
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    task.record = run_record(cfg, tokenizer)

    check_output_paths(trainer, output_dir)
    _record_run_info(
        trainer,
        output_dir,
        cfg.seed,
        datamodule.corpus.corpus_sha256,
        resumed_from=str(start.path) if start and start.resume else None,
    )
    try:
        trainer.fit(
            task, datamodule=datamodule, ckpt_path=start.path if start and start.resume else None, weights_only=True
        )
    except RunStopped as err:  # diverged or interrupted: say so in metrics.json; the last good checkpoint stays
        if trainer.is_global_zero:
            record_failure(cfg, err)
        raise
    except MisconfigurationException as err:  # Lightning's own check of the trainer, callbacks and loggers
        raise ConfigError(
            f"Lightning refused this setup: {' '.join(str(err).split())} "
            "Change the trainer/callbacks/logger settings it names."
        ) from None
    tokens_seen = task.tokens_seen * trainer.world_size  # before the best checkpoint's count is loaded back
    scores = _final_metrics(trainer, task, datamodule)
    sample = sample_text(
        task.model,
        tokenizer,
        cfg.sample.prompt,
        cfg.sample.max_new_tokens,
        temperature=cfg.sample.temperature,
        top_k=cfg.sample.top_k,
        seed=cfg.seed,
    )

    metrics: dict[str, Any] = {
        "model": cfg.names.model,
        "tokenizer": cfg.names.tokenizer,
        "data": datamodule.name,
        **{key: scores[key] for key in sorted(scores) if "/" in key},
        "best_step": scores["best_step"],
        "params": task.num_parameters,
        "vocab_size": tokenizer.vocab_size,
        "steps": trainer.global_step,
        "tokens_seen": tokens_seen,
        "bytes_seen": round(tokens_seen * datamodule.train_bytes_per_token),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "status": "completed",
    }
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "sample.txt", sample)
        atomic_write_json(output_dir / "metrics.json", metrics)
        _log_to_dashboards(trainer, cfg, metrics, sample)
        print_summary(metrics, sample)
    return metrics


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
    atomic_write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics


def _record_run_info(
    trainer: pl.Trainer, output_dir: Path, seed: int, corpus_sha256: str, resumed_from: str | None
) -> None:
    """run_info.json (seed, versions, commit, corpus hash) and the same in TensorBoard's Text tab."""
    if not trainer.is_global_zero:
        return
    info = collect_run_info(seed, corpus_sha256, resumed_from)
    atomic_write_json(output_dir / "run_info.json", merge_with_earlier(info, output_dir / "run_info.json"))
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("run_info", as_markdown(info), global_step=trainer.global_step)


def _log_to_dashboards(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, Any], sample: str) -> None:
    final = {
        f"final/{key.replace('/', '_')}": metrics[key]
        for key in ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")
    }
    hparams = dashboard_hparams(cfg, {"params": metrics["params"], "vocab_size": metrics["vocab_size"]})
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams, metrics=final)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("sample", f"```\n{sample}\n```", global_step=trainer.global_step)
        logger.finalize("success")

"""What a run shows in TensorBoard besides its scalars: run info, the sample, and the HParams table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from lmlab.io import atomic_write_json
from lmlab.run.info import as_markdown, collect_run_info, merge_with_earlier

FINAL_SCORES = ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")
COSTS = ("train_flops", "wall_time_s", "cpu_time_s")  # what the run spent, beside its scores


def _add_text(trainer: pl.Trainer, tag: str, text: str) -> None:
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, global_step=trainer.global_step)


def log_run_info(trainer: pl.Trainer, output_dir: Path, seed: int, corpus_sha256: str, start: Any) -> None:
    """run_info.json (seed, versions, commit, corpus hash) and the same in TensorBoard's Text tab."""
    resumed_from = str(start.path) if start and start.resume else None
    info = collect_run_info(seed, corpus_sha256, resumed_from)
    atomic_write_json(output_dir / "run_info.json", merge_with_earlier(info, output_dir / "run_info.json"))
    _add_text(trainer, "run_info", as_markdown(info))


def dashboard_hparams(cfg: DictConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The same hyperparameter keys for every run, so TensorBoard's HParams tab hides none."""
    model, data, opt = cfg.model, cfg.data, cfg.task.optimizer
    return {
        "model": cfg.names.model,
        "tokenizer": cfg.names.tokenizer,
        "data": cfg.names.data,
        "d_model": int(model.get("d_model", 0)),
        "n_layer": int(model.get("n_layer", 0)),
        "n_head": int(model.get("n_head", 0)),
        "dropout": float(model.get("dropout", 0.0)),
        "block_size": int(data.block_size),
        "batch_size": int(data.batch_size),
        "stateful": bool(data.stateful),
        "optimizer": cfg.names.optimizer,
        "lr": float(opt.lr),
        "weight_decay": float(cfg.task.get("weight_decay", 0.0)),
        "scheduler": cfg.names.scheduler,
        "max_steps": int(cfg.trainer.max_steps),
        "precision": str(cfg.trainer.precision),
        "seed": int(cfg.seed),
        **extra,
    }


def log_final(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, Any], sample: str) -> None:
    """The HParams table row (settings and final scores, as `final/*` tags) and the end-of-run sample."""
    final = {f"final/{key.replace('/', '_')}": metrics[key] for key in FINAL_SCORES}
    final.update({f"final/{key}": metrics[key] for key in COSTS if key in metrics})
    hparams = dashboard_hparams(cfg, {"params": metrics["params"], "vocab_size": metrics["vocab_size"]})
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams, metrics=final)
    _add_text(trainer, "sample", f"```\n{sample}\n```")
    for logger in trainer.loggers:
        logger.finalize("success")

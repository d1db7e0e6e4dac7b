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
from omegaconf import DictConfig, OmegaConf

from lmlab.config import build, dashboard_hparams
from lmlab.data import TextDataModule
from lmlab.generation import generate
from lmlab.io import atomic_write_json, atomic_write_text
from lmlab.summary import print_summary
from lmlab.task import LanguageModelTask
from lmlab.tokenizers import Tokenizer


def sample_text(model: torch.nn.Module, tokenizer: Tokenizer, cfg: DictConfig) -> str:
    """A short generated text, seeded, from the configured prompt (a newline by default)."""
    prompt = tokenizer.encode(cfg.sample.prompt)
    if len(prompt) == 0:
        prompt = [0]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)[None]
    out = generate(model, ids, cfg.sample.max_new_tokens, temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                   generator=torch.Generator(device=device).manual_seed(cfg.seed))
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def _final_metrics(trainer: pl.Trainer, task: LanguageModelTask, datamodule: TextDataModule) -> dict[str, float]:
    """Validation and test on the best checkpoint by val/bpb (the last weights if none was saved)."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    scores: dict[str, float] = {}
    for split_metrics in (*trainer.validate(task, datamodule=datamodule, ckpt_path=best, verbose=False),
                          *trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False)):
        scores.update({key: float(value) for key, value in split_metrics.items()})
    scores["best_step"] = int(torch.load(best, map_location="cpu", weights_only=True)["global_step"]) if best else trainer.global_step
    return scores


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment and return its metrics (also written to `<run dir>/metrics.json`)."""
    started = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    datamodule: TextDataModule = build(cfg.data, "data", tokenizer=build(cfg.tokenizer, "tokenizer"))
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer
    tokenizer.save(output_dir / "tokenizer.json")

    model = build(cfg.model, "model", vocab_size=tokenizer.vocab_size)
    task = LanguageModelTask(model, optimizer=build(cfg.optimizer, "optimizer"),
                             scheduler=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
                             label_smoothing=cfg.label_smoothing, stateful=cfg.data.stateful)
    callbacks = [build(node, f"callbacks.{name}") for name, node in cfg.get("callbacks", {}).items()]
    loggers = [build(node, f"logger.{name}") for name, node in cfg.get("logger", {}).items()]
    trainer: pl.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers)

    trainer.fit(task, datamodule=datamodule)
    scores = _final_metrics(trainer, task, datamodule)
    sample = sample_text(task.model, tokenizer, cfg)

    tokens_seen = task.tokens_seen * trainer.world_size
    metrics: dict[str, Any] = {
        "model": cfg.names.model, "tokenizer": cfg.names.tokenizer, "data": datamodule.name,
        **{key: scores[key] for key in sorted(scores) if "/" in key}, "best_step": scores["best_step"],
        "params": task.num_parameters, "vocab_size": tokenizer.vocab_size, "steps": trainer.global_step,
        "tokens_seen": tokens_seen, "bytes_seen": round(tokens_seen * datamodule.train_bytes_per_token),
        "wall_time_s": round(time.perf_counter() - started, 2), "status": "completed",
    }
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "sample.txt", sample)
        atomic_write_json(output_dir / "metrics.json", metrics)
        _log_to_dashboards(trainer, cfg, metrics, sample)
        print_summary(metrics, sample)
    return metrics


def _log_to_dashboards(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, Any], sample: str) -> None:
    final = {f"final/{key.replace('/', '_')}": metrics[key] for key in
             ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")}
    hparams = dashboard_hparams(cfg, {"params": metrics["params"], "vocab_size": metrics["vocab_size"]})
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams, metrics=final)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("sample", f"```\n{sample}\n```", global_step=trainer.global_step)
        logger.finalize("success")

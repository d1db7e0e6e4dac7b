"""What a run shows in its trackers besides the curves: run info, the sample, the settings and final scores.

TensorBoard is set up to compare runs at a glance:
- the HParams tab declares its columns (hparams_config_pb of tensorboard.plugins.hparams, whose `api`
  module re-exports it but imports TensorFlow): model, tokenizer, learning
  rate and parameter count lead, then whatever else the sweep varies; the final val/test bits per
  byte are its metrics. Settings every run shares stay out of the table (they are in config.yaml and
  the Text tab's run info).
- the final scores are scalars of a `final` sub-run, at the best checkpoint's step: HParams reads
  metrics from scalars, and there the best validation score sits on its own curve instead of in a
  chart of its own at step 0.
- `ComparisonDashboard` logs each validation also against the training text read (kB) and the
  training compute (MFLOP), the x-axes that compare tokenizers and model sizes, and lays the charts
  out in the Custom Scalars tab.
Other trackers (lmlab.run.loggers) get the same settings and final scores in their own form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, summary_v2
from torch.utils.tensorboard import SummaryWriter

from lmlab.io import atomic_write_json
from lmlab.run.info import as_markdown, collect_run_info, merge_with_earlier
from lmlab.run.labels import swept_keys, varying_values

FINAL_SCORES = ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")
COSTS = ("train_flops", "wall_time_s", "cpu_time_s")  # what the run spent, beside its scores

# The HParams table's leading columns, whatever the sweep, and their headings.
LEADING_HPARAMS = {"model": "model", "tokenizer": "tokenizer", "lr": "learning rate", "params": "parameters"}
# Every other setting of dashboard_hparams and the config key that sets it: a column when the sweep varies it.
SWEPT_HPARAMS = {
    "data": "data",
    "d_model": "model.d_model",
    "n_layer": "model.n_layer",
    "n_head": "model.n_head",
    "dropout": "model.dropout",
    "block_size": "data.block_size",
    "batch_size": "data.batch_size",
    "stateful": "data.stateful",
    "optimizer": "optimizer",
    "weight_decay": "task.optimizer.weight_decay",
    "scheduler": "scheduler",
    "max_steps": "trainer.max_steps",
    "precision": "trainer.precision",
    "seed": "seed",
}
FINAL_RUN = "final"  # the sub-run holding the final scores, HParams' metric group
FINAL_METRICS = {"val/bpb": "val bits/byte (best checkpoint)", "test/bpb": "test bits/byte"}
TYPES = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING}


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
    """The same hyperparameter keys for every run, so that trackers compare runs key by key."""
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


def final_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The final scores and costs every tracker records, as `final/val_bpb`, `final/train_flops`, ..."""
    final = {f"final/{key.replace('/', '_')}": metrics[key] for key in FINAL_SCORES}
    final.update({f"final/{key}": metrics[key] for key in COSTS if key in metrics})
    return final


def hparams_columns(swept: set[str]) -> list[str]:
    """The HParams table's columns: the leading four, then the settings this sweep varies."""
    return [*LEADING_HPARAMS, *(name for name, key in SWEPT_HPARAMS.items() if key in swept)]


def hparams_experiment(hparams: dict[str, Any], columns: list[str]) -> Summary:
    """The HParams tab's configuration: its columns (all marked as differing, so the tab shows them
    first) and the final scores as metrics, read from the `final` sub-run."""
    declared = [summary_v2.HParam(name, display_name=LEADING_HPARAMS.get(name)) for name in columns]
    metrics = [summary_v2.Metric(tag, group=FINAL_RUN, display_name=title) for tag, title in FINAL_METRICS.items()]
    summary = summary_v2.hparams_config_pb(hparams=declared, metrics=metrics)
    value = summary.value[0]
    data = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    for info in data.hparam_infos:
        info.differs = True
        info.type = TYPES.get(type(hparams[info.name]), api_pb2.DATA_TYPE_FLOAT64)
    plugin_data = metadata.plugin_data_pb2.HParamsPluginData(experiment=data)
    value.metadata.CopyFrom(metadata.create_summary_metadata(plugin_data))
    return summary


def write_tensorboard_final(log_dir: str | Path, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
    """One HParams row: the experiment's columns, this run's settings, and its final scores in the
    `final` sub-run at the best checkpoint's step. Own writers: Lightning has closed the run's by now.

    The Trial ID column is narrow: in a sweep it shows the values the sweep varies (`gpt bpe`), the
    run's name without the keys, else the run folder's name.
    """
    swept = swept_keys(HydraConfig.get()) if _in_sweep() else set()
    trial_id = (varying_values(HydraConfig.get()) if _in_sweep() else None) or Path(log_dir).name
    with SummaryWriter(str(log_dir)) as writer:
        writer.file_writer.add_summary(hparams_experiment(hparams, hparams_columns(swept)))
        writer.file_writer.add_summary(summary_v2.hparams_pb(hparams, trial_id=trial_id))
    with SummaryWriter(str(Path(log_dir) / FINAL_RUN)) as final:
        for tag in FINAL_METRICS:
            final.add_scalar(tag, metrics[tag], global_step=metrics["best_step"])


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def log_final(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, Any], sample: str) -> None:
    """Every tracker's record of the run's settings and final scores, and the end-of-run sample.

    A tracker of lmlab.run.loggers writes them in its own form (`log_final`); any other Lightning
    logger gets them as hyperparameters and metrics at the best checkpoint's step.
    """
    hparams = dashboard_hparams(cfg, {"params": metrics["params"], "vocab_size": metrics["vocab_size"]})
    for logger in trainer.loggers:
        if hasattr(logger, "log_final"):
            logger.log_final(hparams, metrics)
        else:
            logger.log_hyperparams(hparams)
            logger.log_metrics(final_scores(metrics), step=metrics["best_step"])
    _add_text(trainer, "sample", f"```\n{sample}\n```")
    for logger in trainer.loggers:
        logger.finalize("success")


class ComparisonDashboard(pl.Callback):
    """Each validation against training text and compute, and the Custom Scalars tab that compares runs.

    TensorBoard's x-axis is the step, which means different amounts of text for char and BPE runs and
    different compute for different model sizes. After each validation, TensorBoard loggers also get
    `val_by_bytes/*` (step = training kilobytes read) and `val_by_flops/*` (step = training MFLOP);
    every logger gets `train/bytes_seen` and `train/flops` at the step, for trackers that plot one
    metric against another. Each run writes the same layout at the start of training; TensorBoard
    merges the layouts of all runs under `--logdir`, one chart per metric with a line per run.
    """

    SCORES = ("bpb", "loss")
    LAYOUT = {
        "lmlab comparison": {
            "val bits per byte by step": ["Multiline", [r"^val/bpb$"]],
            "val bits per byte by training text read (kB)": ["Multiline", [r"^val_by_bytes/bpb$"]],
            "val bits per byte by training compute (MFLOP)": ["Multiline", [r"^val_by_flops/bpb$"]],
            "val perplexity": ["Multiline", [r"^val/ppl$"]],
            "training throughput (tokens/s)": ["Multiline", [r"^train/tokens_per_s$"]],
        }
    }

    def __init__(self) -> None:
        self._flops_per_token = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._flops_per_token = pl_module.model.flops_per_token(trainer.datamodule.block_size)
        if not trainer.is_global_zero:
            return
        for writer in _tensorboard_writers(trainer):
            writer.add_custom_scalars(self.LAYOUT)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        tokens = pl_module.tokens_seen * trainer.world_size
        seen = {
            "bytes": round(tokens * trainer.datamodule.train_bytes_per_token),
            "flops": tokens * self._flops_per_token,
        }
        for logger in trainer.loggers:
            logger.log_metrics(
                {"train/bytes_seen": seen["bytes"], "train/flops": seen["flops"]}, step=trainer.global_step
            )
        scores = {key: float(trainer.callback_metrics[f"val/{key}"]) for key in self.SCORES}
        for writer in _tensorboard_writers(trainer):
            for key, value in scores.items():
                writer.add_scalar(f"val_by_bytes/{key}", value, global_step=seen["bytes"] // 1000)
                writer.add_scalar(f"val_by_flops/{key}", value, global_step=seen["flops"] // 1_000_000)


def _tensorboard_writers(trainer: pl.Trainer) -> list[SummaryWriter]:
    return [
        logger.experiment
        for logger in trainer.loggers
        if isinstance(getattr(logger, "experiment", None), SummaryWriter)
    ]

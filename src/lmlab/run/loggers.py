"""The trackers a run reports to (conf/logger/): TensorBoard, CSV, MLflow, W&B and Aim, any several at once.

Each class is Lightning's logger with two lmlab habits: no `epoch` series (Lightning adds one to every
logged step; runs are bounded by steps, so it is a flat line that compares nothing), and a
`log_final` that records the run's settings and final scores where that tracker shows them best.
The curves reach every tracker through Lightning. A sweep's runs share one MLflow or Aim experiment or W&B
project named after the sweep's folder, and each run is named after its own folder (in a sweep: the
overrides the sweep varies, lmlab.run.labels), as TensorBoard names it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig
from pytorch_lightning import loggers as pl_loggers
from pytorch_lightning.loggers import Logger

from lmlab.errors import ConfigError
from lmlab.run.build import build
from lmlab.run.dashboards import final_scores, write_tensorboard_final

SINGLE_RUN_EXPERIMENT = "lmlab"  # the MLflow or Aim experiment / W&B project of runs outside a sweep


def _without_epoch(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key != "epoch"}


class TensorBoardLogger(pl_loggers.TensorBoardLogger):
    """Event files in the run folder; the HParams row and final scores as lmlab.run.dashboards lays them out."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(_without_epoch(metrics), step)

    def log_final(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        write_tensorboard_final(self.log_dir, hparams, metrics)


class CSVLogger(pl_loggers.CSVLogger):
    """metrics.csv (every logged value by step) and hparams.yaml in the run folder."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(_without_epoch(metrics), step)

    def log_final(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.log_hyperparams(hparams)
        self.log_metrics(final_scores(metrics), step=metrics["best_step"])


class MLFlowLogger(pl_loggers.MLFlowLogger):
    """A run in an MLflow tracking store: settings as params, curves and final scores as metrics.

    A `sqlite:///PATH` store's folder is created if missing (MLflow does not), so the default store
    in outputs/ works from any working directory.
    """

    requires = ("mlflow", "mlflow")  # (module, lmlab's extra)

    def __init__(self, tracking_uri: str | None = None, **kwargs: Any) -> None:
        if tracking_uri and tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        super().__init__(tracking_uri=tracking_uri, **kwargs)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(_without_epoch(metrics), step)

    def log_final(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.log_hyperparams(hparams)
        self.log_metrics(final_scores(metrics), step=metrics["best_step"])


class WandbLogger(pl_loggers.WandbLogger):
    """A W&B run (offline by default: `wandb sync` uploads it later): settings in its config, curves
    in its history, final scores in its summary, which W&B's run table shows."""

    requires = ("wandb", "wandb")

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(_without_epoch(metrics), step)

    def log_final(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Settings and scores, then the run is finished: W&B keeps one active run per process, and the
        next job of a sweep (run in this process by Hydra's basic launcher) must start its own."""
        self.log_hyperparams(hparams)
        self.experiment.summary.update(final_scores(metrics))
        self.experiment.finish()

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "success" and self._experiment is not None:
            self._experiment.finish(exit_code=1)  # a failed job's run ends here, not in the next job


class AimLogger(Logger):
    """An Aim run in an Aim repository: settings as its `hparams`, curves and final scores as metrics.

    It holds Aim's own Lightning logger (aim.pytorch_lightning.AimLogger) rather than deriving from it:
    aim is an optional extra, so this module cannot import it, and Aim's class derives from whichever
    Lightning package imports (`lightning` before `pytorch_lightning`), not always the one lmlab runs.
    """

    requires = ("aim", "aim")

    def __init__(self, repo: str, experiment: str | None = None, run_name: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        from aim.pytorch_lightning import AimLogger as Aim

        self._aim = Aim(repo=str(Path(repo).expanduser()), experiment=experiment, run_name=run_name, **kwargs)
        self._final_logged = False

    @property
    def name(self) -> str | None:
        return self._aim.name

    @property
    def version(self) -> str:
        return self._aim.version

    @property
    def experiment(self) -> Any:
        """The aim.Run (created on first use)."""
        return self._aim.experiment

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._aim.log_hyperparams(params)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._aim.log_metrics(metrics, step)  # Aim's own logger keeps `epoch` off its series

    def log_final(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.log_hyperparams(hparams)
        self.log_metrics(final_scores(metrics), step=metrics["best_step"])
        self._final_logged = True

    def finalize(self, status: str) -> None:
        """Close the run once its final scores are in, or on failure; not when Lightning ends the fit,
        as the test and the final scores come after that and Aim reopens a closed run only by force,
        warning of data corruption."""
        if self._final_logged or status != "success":
            self._aim.finalize(status)


def tracker_names(cfg: DictConfig) -> tuple[str, str]:
    """(experiment, run): the sweep folder's name, or SINGLE_RUN_EXPERIMENT outside a sweep; the run folder's name."""
    run = Path(cfg.paths.output_dir).name
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(str(HydraConfig.get().sweep.dir)).name, run
    return SINGLE_RUN_EXPERIMENT, run


def check_installed(name: str, node: DictConfig) -> None:
    """A chosen tracker whose package is missing: one line naming the extra that installs it."""
    target = node.get("_target_")
    requires = getattr(get_class(target), "requires", None) if isinstance(target, str) else None
    if requires and importlib.util.find_spec(requires[0]) is None:
        module, extra = requires
        raise ConfigError(
            f"logger={name} needs the {module} package, which is not installed: pip install -e '.[{extra}]' "
            f"(or choose other loggers, e.g. logger=[tensorboard,csv])"
        )


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of `cfg.logger`, with experiment and run names filled in where the config leaves them null."""
    experiment, run = tracker_names(cfg)
    names = {
        "experiment_name": experiment,
        "experiment": experiment,
        "project": experiment,
        "run_name": run,
        "name": run,
    }
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        check_installed(name, node)
        unset = {key: value for key, value in names.items() if key in node and node[key] is None}
        loggers.append(build(node, f"logger.{name}", **unset))
    return loggers

"""Hydra/OmegaConf glue: the repository-root resolver and turning configs into objects with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError, LmlabError
from lmlab.run_dirs import RESOLVER, claimed_dir

REPO_ROOT = Path(__file__).resolve().parents[2]

if not OmegaConf.has_resolver("lmlab_root"):
    # Lets configs name bundled files (data/tinyshakespeare.txt) whatever the working directory.
    OmegaConf.register_new_resolver("lmlab_root", lambda: str(REPO_ROOT))
if not OmegaConf.has_resolver(RESOLVER):
    # Default run and sweep directories, made unique by lmlab.run_dirs.ClaimFreshDirs when a run starts.
    OmegaConf.register_new_resolver(RESOLVER, claimed_dir)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` whose bad-value errors become one-line ConfigErrors naming `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, LmlabError):
            raise cause from None
        # ImportError: a `_target_` that does not exist, or an accelerator whose library is missing
        if isinstance(cause, (ValueError, TypeError, ImportError, MisconfigurationException)):
            raise ConfigError(f"invalid {key} config: {' '.join(str(cause).split())}") from None
        raise


def dashboard_hparams(cfg: DictConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The same hyperparameter keys for every run, so TensorBoard's HParams tab hides none."""
    model, data, opt = cfg.model, cfg.data, cfg.optimizer
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
        "weight_decay": float(opt.get("weight_decay", 0.0)),
        "scheduler": cfg.names.scheduler,
        "max_steps": int(cfg.trainer.max_steps),
        "precision": str(cfg.trainer.precision),
        "seed": int(cfg.seed),
        **extra,
    }

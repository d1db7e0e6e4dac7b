"""Shared test helpers: configs composed from the real conf/ tree, shrunk to run in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lmlab.callbacks import ExactResume
from lmlab.cli import register_resolvers
from lmlab.models import family, family_names
from lmlab.run.distributed import SameStreamDDPStrategy

register_resolvers()

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
MODELS = family_names()
TOKENIZERS = ["char", "word", "bpe"]


def tiny_overrides(model: str, corpus: Path, steps: int = 20) -> list[str]:
    """Command-line overrides that shrink any model x tokenizer run to a few seconds on CPU."""
    size = [f"model.{key}={value}" for key, value in family(model).tiny.items()]  # the registry's tiny shape
    return [
        f"model={model}",
        "data=text",
        f"data.path={corpus}",
        "data.block_size=32",
        "data.batch_size=8",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "task.scheduler.warmup_steps=2",
        "sample.max_new_tokens=20",
        *size,
    ]


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """compose() the real config as `python train.py OVERRIDES` would, with the run writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[o for o in overrides if o], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(output_dir.parent / "cache")
        del cfg["hydra"]
    return cfg


def compose_command(name: str, overrides: list[str]) -> DictConfig:
    """compose() conf/<name>.yaml (evaluate, generate, export) as `python <name>.py OVERRIDES` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


SWEEP_BYTES, SWEEP_PARAMS = 5120, 50_000  # the tiny sweep's training text per run and parameter target


def sweep_overrides(corpus: Path, sweep_dir: Path, swept: list[str], fixed: tuple[str, ...] = ()) -> list[str]:
    """`train.py -m` overrides for a seconds-long sweep; only the `swept` settings name its run folders."""
    given = {o.split("=")[0] for o in (*swept, *fixed)}
    tiny = ("model.n_layer=1", "trainer.max_steps=10")
    fixed = (
        "data=text",
        f"data.path={corpus}",
        "data.block_size=32",
        "data.batch_size=8",
        "trainer.val_check_interval=10",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "task.scheduler.warmup_steps=2",
        "sample.max_new_tokens=20",
        f"paths.cache_dir={sweep_dir.parent / 'cache'}",
        *fixed,
        *(o for o in tiny if o.split("=")[0] not in given),
    )
    names = ",".join(o.split("=")[0] for o in fixed)
    return [*fixed, *swept, f"hydra.sweep.dir={sweep_dir}", f"hydra.job.config.override_dirname.exclude_keys=[{names}]"]


def cpu_trainer(devices: int, callbacks=(), **kwargs) -> pl.Trainer:
    """A bare Trainer on 1 or N CPU processes (DDP over gloo), sharding its data and saving the carried
    state and RNG (ExactResume) as lmlab does."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=SameStreamDDPStrategy() if devices > 1 else "auto",  # conf/trainer/ddp.yaml's
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, ExactResume()],
        **kwargs,
    )


def train_losses(task, batches, lr: float = 1e-2, autocast_dtype: torch.dtype | None = None) -> list[float]:
    """One AdamW step on `task`'s training loss per (x, y) batch, by hand (no Trainer); the losses."""
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = task._step_loss(x, y, training=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses

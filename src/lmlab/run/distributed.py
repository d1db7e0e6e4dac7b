"""Several processes, sharded weights and cluster jobs: the DDP and FSDP strategies, the FSDP wrap policy,
and the checks that stop a distributed setup which could not work before it is launched or trained
(full weights for sampling are lmlab.fsdp's: the callbacks need them too).

FSDP shards every transformer block on its own (its weights are gathered just before the block runs
and freed after), the embeddings and the head stay in the root unit. A SLURM job started through
Hydra's submitit launcher runs one task per GPU; Lightning's SLURM environment then reads its rank
from SLURM, so the launcher's `nodes` and `tasks_per_node` must be the Trainer's `num_nodes` and
`devices`, or Lightning waits for processes that never come.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lmlab.checkpoint.format import is_sharded
from lmlab.errors import ConfigError
from lmlab.fsdp import uses_fsdp
from lmlab.lightning_compat import KeepFSDPRootAcrossStages, SameStreamDDPSetup, saves_sharded
from lmlab.models import LanguageModel

SLURM_LAUNCHER = "SlurmLauncher"
LOCAL_LAUNCHER = "LocalLauncher"


class BlockWrapPolicy(ModuleWrapPolicy):
    """One FSDP unit per block of the model being wrapped: the classes its `block_types` declares.

    Per-block units keep only one block's full weights in memory at a time and let the next block's
    all-gather overlap this block's compute; the embeddings and head (tied in GPT) share the root unit.
    The classes are read from the model when FSDP wraps it, so any family, registered or not, is
    sharded by its own blocks and this module names none.
    """

    def __init__(self) -> None:
        super().__init__(())

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        blocks = {block for m in root_module.modules() if isinstance(m, LanguageModel) for block in m.block_types}
        self._module_classes, self._module_classes_str = blocks, str(blocks)
        return super()._run_policy(root_module, ignored_modules, root_kwargs)


def block_wrap_policy() -> BlockWrapPolicy:
    """FSDP's auto-wrap policy for lmlab models (conf/trainer/fsdp.yaml)."""
    return BlockWrapPolicy()


class SameStreamDDPStrategy(SameStreamDDPSetup, DDPStrategy):
    """Lightning's DDPStrategy with DDP built on the stream that then trains (conf/trainer/ddp.yaml;
    lmlab.lightning_compat.SameStreamDDPSetup says why)."""


class AtomicFSDPStrategy(KeepFSDPRootAcrossStages, FSDPStrategy):
    """Lightning's FSDPStrategy with whole checkpoints and evaluation after training (conf/trainer/fsdp.yaml).

    Checkpoints: Lightning writes a sharded checkpoint's files into the existing folder one by one, so
    a job killed mid-save (a SLURM time limit, a node failure) leaves a `last.ckpt/` of old and new
    shards that a resume would trust. Here every rank writes into `<name>.saving/` and global rank 0
    swaps it in once all shards and `meta.pt` are on disk (two renames, the old folder deleted after):
    a reader finds the old checkpoint or the new one, never a mixture.

    Evaluation after fit (`train.py` scores val/test with the same Trainer): the model keeps its FSDP
    root from stage to stage (lmlab.lightning_compat.KeepFSDPRootAcrossStages).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not saves_sharded(self):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging, old = path.with_name(path.name + ".saving"), path.with_name(path.name + ".old")
        if self.is_global_zero:
            for leftover in (staging, old):  # left by a save that was killed
                shutil.rmtree(leftover, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()  # every rank's shards are written
        if self.is_global_zero:
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return None


def check_distributed(cfg: DictConfig, model: LanguageModel) -> None:
    """Settings that would crash, hang or silently do nothing on several processes: FSDP for a recurrent
    model, a sharded checkpoint resumed without FSDP, a SLURM launcher whose tasks disagree with the Trainer."""
    strategy = cfg.trainer.get("strategy", "auto")
    fsdp = uses_fsdp(strategy)
    if fsdp:
        check_fsdp_model(model)
    target = str(strategy if isinstance(strategy, str) else strategy.get("_target_", ""))
    if fsdp and not _is_subclass(target, AtomicFSDPStrategy):
        raise ConfigError(
            f"trainer.strategy={target} is Lightning's FSDP as it comes: one shard unit for the whole model, "
            "checkpoints that a kill can half-write, and val/test after training on sharded weights; "
            "use trainer=fsdp (lmlab's preset) instead"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and is_sharded(Path(ckpt_path)) and not fsdp:
        raise ConfigError(
            f"{ckpt_path} is a sharded FSDP checkpoint: resume it with trainer=fsdp (any number of GPUs), "
            "or fine-tune from it with init_from= under another strategy"
        )
    check_launcher(_launcher_config(), cfg.trainer)


def check_fsdp_model(model: LanguageModel) -> None:
    """FSDP shards weights across GPUs; a recurrent net's cuDNN kernel needs its whole weight buffer on
    every GPU at every time step, and lmlab's recurrent models fit one GPU many times over."""
    recurrent = next((m for m in model.modules() if isinstance(m, nn.RNNBase)), None)
    if recurrent is not None:
        raise ConfigError(
            f"trainer.strategy=fsdp cannot help {type(model).__name__}: its {type(recurrent).__name__} runs as one "
            "kernel over weights that must stay whole on every GPU; use trainer=ddp (or trainer.strategy=ddp)"
        )


def check_launcher(launcher: DictConfig | None, trainer_cfg: DictConfig) -> None:
    """A submitit launcher must start exactly the processes the Trainer expects: on SLURM one task per
    device on each of `trainer.num_nodes` nodes; locally one task, which starts its own processes."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if target.endswith(LOCAL_LAUNCHER):
        tasks = launcher.get("tasks_per_node", 1)
        if tasks != 1 or launcher.get("nodes", 1) != 1:
            raise ConfigError(
                f"hydra/launcher=submitit_local with tasks_per_node={tasks}: Lightning starts a local run's "
                "processes itself; set hydra.launcher.tasks_per_node=1 hydra.launcher.nodes=1 and use trainer.devices"
            )
        return
    if not target.endswith(SLURM_LAUNCHER):
        return
    devices, num_nodes = trainer_cfg.get("devices", "auto"), trainer_cfg.get("num_nodes", 1)
    per_node = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else devices
    if not isinstance(per_node, int) or isinstance(per_node, bool) or per_node < 1:
        raise ConfigError(
            f"trainer.devices={devices} under SLURM: set trainer.devices to the number of GPUs per node "
            "(e.g. trainer.devices=8); hydra/launcher=slurm then asks SLURM for one task per GPU"
        )
    tasks, nodes = launcher.get("tasks_per_node", 1), launcher.get("nodes", 1)
    if tasks != per_node:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={per_node}: SLURM must run one task per "
            f"device; set hydra.launcher.tasks_per_node={per_node} (hydra/launcher=slurm does it for you)"
        )
    if nodes != num_nodes:
        raise ConfigError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}: set both to the number of nodes, "
            f"e.g. trainer.num_nodes={nodes} (hydra/launcher=slurm takes nodes from trainer.num_nodes)"
        )
    gpus = launcher.get("gpus_per_node")
    on_gpu = str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda")
    if on_gpu and not launcher.get("gres") and (gpus is None or gpus < per_node):
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus} leaves {per_node} GPU tasks per node without GPUs: "
            f"set hydra.launcher.gpus_per_node={per_node}"
        )


def _is_subclass(target: str, cls: type) -> bool:
    """Whether the `_target_` path `target` names `cls` or a subclass of it (a Lightning name like `fsdp` does not)."""
    from hydra.utils import get_class

    if "." not in target:
        return False
    try:
        found = get_class(target)
    except (ImportError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, cls)


def _launcher_config() -> DictConfig | None:
    """This job's Hydra launcher node, when Hydra (or a test's compose) set one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().get("launcher")

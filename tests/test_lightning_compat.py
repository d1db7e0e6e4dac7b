"""lmlab.lightning_compat, pinned to pytorch-lightning 2.6.6: each test fails once upstream no longer
needs the piece it covers (the behaviour worked around is gone) or moved what the piece reads."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from lmlab import lightning_compat
from lmlab.callbacks import SyncFreeProgressBar
from lmlab.lightning_compat import (
    first_validation_step,
    is_local_path,
    planned_world_size,
    saves_sharded,
    uses_distributed_sampler,
    uses_loss_scaler,
)

LIGHTNING_PACKAGES = ("pytorch_lightning", "lightning_fabric", "lightning")


def _trainer(**options) -> pl.Trainer:
    quiet = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    return pl.Trainer(accelerator="cpu", **{**quiet, "enable_progress_bar": False, **options})


def test_lightning_is_the_pinned_version():
    """Every piece below was checked against this version; a new one means checking them again."""
    assert pl.__version__ == "2.6.6"


def test_lightning_still_writes_epoch_minus_two_for_step_bound_runs():
    trainer = _trainer(max_steps=5, max_epochs=-1)
    bar, ours = RichProgressBar(), SyncFreeProgressBar()
    bar._trainer = ours._trainer = trainer
    assert bar._get_train_description(2) == "Epoch 2/-2"  # what StepBoundEpochDescription removes
    assert ours._get_train_description(2) == "Epoch 2"
    bounded = _trainer(max_steps=5, max_epochs=3)
    ours._trainer = bounded
    assert ours._get_train_description(2).strip() == "Epoch 2/2"  # epoch-bound runs keep Lightning's


def test_lightning_still_builds_ddp_on_a_side_stream():
    """Lightning-AI/pytorch-lightning#21746 removes the side stream: then SameStreamDDPSetup goes."""
    source = inspect.getsource(DDPStrategy._setup_model)
    assert "torch.cuda.stream(torch.cuda.Stream())" in source
    assert "determine_ddp_device_ids" in source and "_ddp_kwargs" in source  # what SameStreamDDPSetup calls


def test_lightning_still_leaves_a_rewrapped_fsdp_root_bare_and_moves_it_to_cpu_at_teardown():
    """KeepFSDPRootAcrossStages: the second stage finds FSDP blocks and does not wrap the root, and
    the teardown of every stage moves the LightningModule it keeps privately to the CPU."""
    setup = inspect.getsource(FSDPStrategy._setup_model)
    assert "if any(isinstance(mod, FullyShardedDataParallel) for mod in model.modules())" in setup
    teardown = inspect.getsource(FSDPStrategy.teardown) + inspect.getsource(pl.strategies.Strategy.teardown)
    assert "self.lightning_module.cpu()" in teardown
    assert "self._lightning_module" in inspect.getsource(pl.strategies.Strategy.lightning_module.fget)


def test_fsdp_still_keeps_its_state_dict_type_private():
    assert not hasattr(FSDPStrategy, "state_dict_type")
    assert saves_sharded(FSDPStrategy(state_dict_type="sharded"))
    assert not saves_sharded(FSDPStrategy(state_dict_type="full"))


def test_the_distributed_sampler_flag_is_still_private():
    assert not hasattr(pl.Trainer, "use_distributed_sampler")
    assert uses_distributed_sampler(_trainer(use_distributed_sampler=True))
    assert not uses_distributed_sampler(_trainer(use_distributed_sampler=False))


def test_lightning_still_has_no_public_local_path_check():
    """checkpoint/atomic_io.py's question; lightning_fabric answers it privately, the same way."""
    from lightning_fabric.utilities import cloud_io

    assert not hasattr(cloud_io, "is_local_file_protocol")
    for path in ("last.ckpt", "/tmp/x/last.ckpt", "file:///tmp/x.ckpt", "s3://bucket/x.ckpt", "gs://b/x.ckpt"):
        assert is_local_path(path) == cloud_io._is_local_file_protocol(path), path
    assert not is_local_path("s3://bucket/last.ckpt")


def test_only_mixed_precision_plugins_scale_the_loss():
    trainer = _trainer(max_steps=1)
    assert not uses_loss_scaler(trainer)
    for plugin, scales in ((Precision(), False), (MixedPrecision("bf16-mixed", "cpu"), False)):
        trainer.strategy.precision_plugin = plugin
        assert uses_loss_scaler(trainer) is scales
    trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert uses_loss_scaler(trainer)


@pytest.mark.parametrize(
    ("devices", "num_nodes", "strategy"),
    [(1, 1, "auto"), (2, 1, "ddp"), ("auto", 1, "auto"), (2, 2, "ddp"), ("3", 1, "ddp")],
)
def test_the_planned_world_size_is_the_trainer_s(devices, num_nodes, strategy):
    trainer_cfg = OmegaConf.create({"accelerator": "cpu", "devices": devices, "num_nodes": num_nodes})
    built = _trainer(devices=devices, num_nodes=num_nodes, strategy=strategy)
    assert planned_world_size(trainer_cfg) == built.world_size


class _ValidationSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.layer(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "options",
    [
        {"val_check_interval": 3},
        {"val_check_interval": 0.5},
        {"val_check_interval": 4, "accumulate_grad_batches": 2},
        {"val_check_interval": 1.0, "check_val_every_n_epoch": 2},
        {"val_check_interval": 10, "check_val_every_n_epoch": None},
        {"val_check_interval": 1.0, "check_val_every_n_epoch": 3},  # after step 24: never in this run
    ],
)
def test_the_first_validation_step_is_lightning_s(options):
    """The schedule re-derived for a plateau schedule (task.configure_optimizers) against a real fit."""
    seen = _ValidationSteps()
    trainer = _trainer(max_steps=20, max_epochs=-1, num_sanity_val_steps=0, callbacks=[seen], **options)
    loader = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=1)
    computed: list[int | None] = []

    class Probe(_Tiny):
        def on_train_start(self) -> None:
            computed.append(first_validation_step(self.trainer, total_steps=20))

    trainer.fit(Probe(), train_dataloaders=loader, val_dataloaders=loader)
    assert computed == [seen.steps[0] if seen.steps else None]


def private_lightning_imports(source: str) -> list[str]:
    """The names a module imports from Lightning that Lightning keeps private (`_PATH`, `x._private`)."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIGHTNING_PACKAGES
        for alias in node.names
        if any(part.startswith("_") for part in [*node.module.split("."), alias.name])
    ]


def test_every_lightning_internal_lmlab_touches_lives_in_lightning_compat():
    """No module but lightning_compat imports a private Lightning name, overrides a private Lightning
    method or reads a private attribute."""
    root = Path(lightning_compat.__file__).parent
    private = ("_setup_model", "_get_train_description", "_lightning_module", "_state_dict_type")
    private += ("_is_local_file_protocol", "_accelerator_connector", "fit_loop")
    offenders = [
        f"{path.relative_to(root)}: {name}"
        for path in root.rglob("*.py")
        if path.name != "lightning_compat.py"
        for name in [*(n for n in private if n in path.read_text()), *private_lightning_imports(path.read_text())]
    ]
    assert offenders == []


def test_a_private_lightning_import_is_found():
    source = "from lightning_fabric.utilities.types import _PATH\nfrom pytorch_lightning.trainer import Trainer\n"
    source += "from torch._dynamo import config\nfrom pytorch_lightning._graveyard import tpu\n"
    assert private_lightning_imports(source) == [
        "lightning_fabric.utilities.types._PATH",
        "pytorch_lightning._graveyard.tpu",
    ]

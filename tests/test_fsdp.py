"""FSDP (`trainer=fsdp`): the preset, the wrap policy, weight-decay groups, sampling during training,
sharded checkpoints that resume exactly and that generate/evaluate read, and the bad-input checks.

Lightning allows its FSDP strategy on GPUs only and torch's FSDP needs `device_id=cpu` to run on the
CPU, so the two-process test runs Lightning's own FSDPStrategy under a subclass that supplies both
(`CPUFSDPStrategy`); everything else (the preset's policy and options, the callbacks, the
checkpoint format) is what a GPU run uses.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from lmlab.callbacks import NonFiniteLossGuard, SelfContainedCheckpoints, ValidationSample
from lmlab.checkpoint import run_record
from lmlab.checkpoint.format import checkpoint_step, is_sharded, load_checkpoint, model_weights, read_checkpoint
from lmlab.errors import ConfigError
from lmlab.fsdp import uses_fsdp
from lmlab.models import GPT, Jamba, Llama, LSTMAttentionLM, Mamba, RecurrentLM, TransformerLM
from lmlab.perf import apply_perf
from lmlab.run.build import build
from lmlab.run.distributed import (
    AtomicFSDPStrategy,
    BlockWrapPolicy,
    block_wrap_policy,
    check_distributed,
    check_fsdp_model,
)
from tests.helpers import SHAKESPEARE, compose_config, tiny_overrides

STEPS, STOP = 6, 3  # the full run's steps; the interrupted run stops (and checkpoints) after STOP


class CPUFSDPStrategy(AtomicFSDPStrategy):
    """The preset's strategy on CPU processes: a subclass passes Lightning's GPU-only check of the
    `fsdp` name, and the wrapper is told `device_id=cpu`, which torch needs to shard on the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._timeout = timedelta(seconds=60)  # a rank left waiting at a collective fails the test, not hangs it

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):  # wrapped by an earlier fit
            return super()._setup_model(model)

        class OnCPU(FullyShardedDataParallel):
            def __init__(self, *args, device_id=None, **kwargs) -> None:
                super().__init__(*args, device_id=torch.device("cpu"), **kwargs)

        with mock.patch("torch.distributed.fsdp.FullyShardedDataParallel", OnCPU):
            return super()._setup_model(model)


class TextLogger(Logger):
    """Keeps what callbacks write to TensorBoard's Text tab (`experiment.add_text`)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[tuple[str, int]] = []

    name, version = "text", 0

    @property
    def experiment(self) -> TextLogger:
        return self

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, global_step))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class LossRecorder(pl.Callback):
    """Every training step's loss on this rank; stops the run after `stop_at` steps, as a kill would
    (the checkpoint of that step has been written by then: validation runs every STOP steps)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True


def _fsdp_config(corpus: Path, run_dir: Path) -> DictConfig:
    mine = {"trainer.accelerator", "trainer.devices", "trainer.max_steps", "trainer.val_check_interval"}
    overrides = [o for o in tiny_overrides("gpt", corpus) if o.split("=")[0] not in mine]
    overrides += ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    overrides += [f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STOP}", "model.n_layer=2"]
    overrides += ["task.optimizer.weight_decay=0.1", "data.batch_size=4"]
    cfg = compose_config(overrides, run_dir)
    with open_dict(cfg):
        cfg.trainer.strategy._target_ = f"{__name__}.CPUFSDPStrategy"
    return cfg


def _fit(cfg: DictConfig, run_dir: Path, stop_at: int | None = None, ckpt_path: str | None = None) -> dict:
    """One Lightning fit of the composed run on this rank: its losses, optimizer groups and logged samples."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    pl.seed_everything(cfg.seed, verbose=False)
    tokenizer = build(cfg.tokenizer, "tokenizer")
    data = build(cfg.data, "data", tokenizer=tokenizer, seed=cfg.seed)
    data.prepare_data()
    model = build(cfg.model, "model", vocab_size=data.tokenizer.vocab_size)
    apply_perf(model, build(cfg.perf, "perf"))  # as train() does: activation checkpointing, FP8
    recorder, texts = LossRecorder(stop_at), TextLogger()
    callbacks = [
        build(cfg.callbacks.model_checkpoint, "callbacks.model_checkpoint"),
        build(cfg.callbacks.last_checkpoint, "callbacks.last_checkpoint"),
        ValidationSample(cfg.sample, max_new_tokens=8),
        NonFiniteLossGuard(),
        SelfContainedCheckpoints(run_record(cfg, data.tokenizer)),
        recorder,
    ]
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=[texts])
    trainer.fit(build(cfg.task, "task", model=model), datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    optimizer = trainer.optimizers[0]
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "losses": recorder.losses,
        "samples": texts.texts,
        "decayed": sum(len(g["params"]) for g in optimizer.param_groups if g["weight_decay"] > 0),
        "weights": weights,
        "wrapped": sorted(
            {type(m.module).__name__ for m in model.modules() if isinstance(m, FullyShardedDataParallel)}
        ),
    }


def _exit_when_done(work) -> None:
    """Run a spawned rank's work, then leave at once: its results are on disk by then, and tearing down
    gloo's threads at interpreter exit now and then aborts the process ("terminate called without an
    active exception") on a loaded machine. A failure still exits non-zero, with its traceback."""
    try:
        work()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _rank_main(rank: int, port: int, corpus: Path, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)

    def work() -> None:
        cfg = _fsdp_config(corpus, root / "straight")
        results = {"straight": _fit(cfg, root / "straight")}
        results["stopped"] = _fit(cfg, root / "killed", stop_at=STOP)
        last = root / "killed" / "checkpoints" / "last.ckpt"
        results["resumed"] = _fit(cfg, root / "killed", ckpt_path=str(last))
        torch.save(results, root / f"rank{rank}.pt")
        dist.barrier()

    _exit_when_done(work)


def _train_main(rank: int, port: int, corpus: Path, run_dir: Path) -> None:
    """train.py's own path, `train(cfg)`, under the preset on this rank: fit, best-checkpoint scoring, sample."""
    from lmlab.run.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)

    def work() -> None:
        cfg = _fsdp_config(corpus, run_dir)
        with open_dict(cfg):
            cfg.trainer.max_steps = 5  # validations at 3 (the best, here or not) and none at 5: scored again
            del cfg.callbacks["progress_bar"]
        train(cfg)
        dist.barrier()

    _exit_when_done(work)


def _checkpointing_main(rank: int, port: int, corpus: Path, root: Path) -> None:
    """The preset's run without and with perf.activation_checkpointing (dropout on) on this rank: its
    losses, and whether each block handed to checkpointing was an FSDP unit."""
    import lmlab.models.base

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    checkpointed, units = lmlab.models.base.checkpointed, []

    def spy(block, *args):
        units.append(isinstance(block, FullyShardedDataParallel))
        return checkpointed(block, *args)

    def work() -> None:
        lmlab.models.base.checkpointed = spy
        losses = {}
        for on in (False, True):
            cfg = _fsdp_config(corpus, root / str(on))
            with open_dict(cfg):
                cfg.perf.activation_checkpointing, cfg.model.dropout = on, 0.1
            losses[on] = _fit(cfg, root / str(on))["losses"]
        torch.save({"losses": losses, "units": units}, root / f"rank{rank}.pt")
        dist.barrier()

    _exit_when_done(work)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("fsdp")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    mp.spawn(_rank_main, args=(_free_port(), corpus, root), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


# --- the preset and the policy (fast) ---


def test_fsdp_preset_builds_lightnings_strategy_with_block_policy_and_sharded_checkpoints(tmp_path):
    cfg = compose_config(["trainer=fsdp", "trainer.devices=2"], tmp_path / "run")
    assert cfg.trainer.precision == "bf16-mixed" and uses_fsdp(cfg.trainer.strategy)
    strategy = build(cfg.trainer.strategy, "trainer.strategy")
    assert type(strategy) is AtomicFSDPStrategy and isinstance(strategy, FSDPStrategy) and uses_fsdp(strategy)
    assert strategy._state_dict_type == "sharded" and strategy.kwargs["use_orig_params"] is True
    assert isinstance(strategy.kwargs["auto_wrap_policy"], BlockWrapPolicy)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert not uses_fsdp("ddp") and uses_fsdp("fsdp") and not uses_fsdp(OmegaConf.create({"_target_": "x.DDPStrategy"}))


@pytest.mark.parametrize(
    ("model", "block"),
    [
        (GPT(40, d_model=16, n_layer=3, n_head=2, block_size=8), "Block"),
        (Llama(40, d_model=16, n_layer=3, n_head=2, block_size=8), "LlamaBlock"),
        (TransformerLM(40, d_model=16, n_layer=3, n_head=2, block_size=8), "PostNormBlock"),
        (Mamba(40, d_model=16, n_layer=3), "MambaBlock"),
        (
            Jamba(40, d_model=16, n_layer=3, n_head=2, n_kv_head=1, attn_every=2, attn_offset=1, block_size=8),
            "JambaLayer",
        ),
    ],
    ids=["gpt", "llama", "transformer", "mamba", "jamba"],
)
def test_wrap_policy_makes_one_unit_per_block_of_every_family(model, block):
    chosen = block_wrap_policy()._run_policy(model, ignored_modules=set(), root_kwargs={})
    units = [type(m).__name__ for m in chosen if m is not model]
    assert units == [block] * 3  # each block, nothing inside it, nothing else beside the root


# --- bad input (fast) ---


@pytest.mark.parametrize(
    "model",
    [RecurrentLM(40, cell="lstm", d_model=16, n_layer=1), RecurrentLM(40, cell="gru", d_model=16, n_layer=1)]
    + [LSTMAttentionLM(40, d_model=16, n_layer=1)],
    ids=["lstm", "gru", "lstm_attn"],
)
def test_fsdp_for_a_recurrent_model_is_one_line_naming_ddp(model):
    with pytest.raises(ConfigError, match=r"cannot help .*use trainer=ddp") as err:
        check_fsdp_model(model)
    assert "\n" not in str(err.value)


def test_lightnings_own_fsdp_is_refused_for_the_preset(tmp_path, small_corpus):
    cfg = compose_config([*tiny_overrides("gpt", small_corpus), "trainer.strategy=fsdp"], tmp_path / "run")
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp is Lightning's FSDP as it comes: .* use trainer=fsdp"):
        check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))


def test_fsdp_recurrent_check_runs_from_the_composed_config(tmp_path, small_corpus):
    cfg = compose_config([*tiny_overrides("lstm", small_corpus), "trainer=fsdp"], tmp_path / "run")
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp cannot help RecurrentLM"):
        check_distributed(cfg, RecurrentLM(40, cell="lstm", d_model=16, n_layer=1))
    check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))  # attention: fine


def test_sharded_checkpoint_resumed_without_fsdp_is_refused(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    (folder / "meta.pt").write_bytes(b"")
    cfg = compose_config(["trainer=ddp", f"ckpt_path={folder}"], tmp_path / "run")
    with pytest.raises(ConfigError, match="sharded FSDP checkpoint: resume it with trainer=fsdp"):
        check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))


def test_a_sharded_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    strategy, path = AtomicFSDPStrategy(state_dict_type="sharded"), tmp_path / "last.ckpt"

    def save(step: int) -> None:
        state = {"model.w": torch.full((4,), float(step))}
        strategy.save_checkpoint({"state_dict": state, "optimizer_states": [], "global_step": step}, path)

    save(1)

    def killed(state, folder):  # the first shard file is written, then the process dies
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    with (
        mock.patch("pytorch_lightning.strategies.fsdp._distributed_checkpoint_save", killed),
        pytest.raises(KeyboardInterrupt),
    ):
        save(2)
    assert checkpoint_step(path) == 1
    assert torch.equal(read_checkpoint_weights(path), torch.full((4,), 1.0))
    save(3)  # the next save clears what the killed one left
    assert checkpoint_step(path) == 3 and torch.equal(read_checkpoint_weights(path), torch.full((4,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def read_checkpoint_weights(path: Path) -> torch.Tensor:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(keys={"model"}, checkpoint_id=path)["model"]["model.w"]


def test_a_folder_that_is_not_a_sharded_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a directory but not a sharded checkpoint"):
        read_checkpoint(tmp_path)


# --- two CPU processes under Lightning's FSDPStrategy (slow) ---


@pytest.mark.slow
def test_fsdp_wraps_the_blocks_and_samples_on_every_validation_without_hanging(fsdp_runs):
    _, ranks = fsdp_runs
    assert ranks[0]["straight"]["wrapped"] == ["Block"]
    assert ranks[0]["straight"]["samples"] == [("val/sample", STOP), ("val/sample", STEPS)]
    assert ranks[1]["straight"]["samples"] == []  # rank 1 sampled too (collective), only rank 0 logs


@pytest.mark.slow
def test_fsdp_weight_decay_applies_to_the_weight_matrices(fsdp_runs):
    _, ranks = fsdp_runs
    model = GPT(40, d_model=32, n_layer=2, n_head=2, block_size=32)  # its matrices: qkv, out, fc, proj per block
    matrices = sum(
        1 for name, p in model.named_parameters() if p.dim() == 2 and "wte" not in name and "wpe" not in name
    )
    assert ranks[0]["straight"]["decayed"] == matrices == 8


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_exactly(fsdp_runs):
    root, ranks = fsdp_runs
    last = root / "killed" / "checkpoints" / "last.ckpt"
    assert is_sharded(last) and checkpoint_step(last) == STEPS
    for rank in ranks:
        straight, stopped, resumed = rank["straight"]["losses"], rank["stopped"]["losses"], rank["resumed"]["losses"]
        assert sorted(stopped) == list(range(1, STOP + 1)) and sorted(resumed) == list(range(STOP + 1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert (stopped | resumed)[step] == pytest.approx(straight[step], abs=1e-6), step
        for name, weight in rank["straight"]["weights"].items():
            torch.testing.assert_close(rank["resumed"]["weights"][name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sharded_checkpoint_loads_in_one_process_for_generate_and_evaluate(fsdp_runs):
    root, ranks = fsdp_runs
    loaded = load_checkpoint(root / "straight" / "checkpoints" / "last.ckpt")
    assert loaded.step == STEPS and loaded.model_config["n_layer"] == 2
    for name, weight in ranks[0]["straight"]["weights"].items():
        assert torch.equal(loaded.model.state_dict()[name], weight), name
    checkpoint = read_checkpoint(root / "straight" / "checkpoints" / "last.ckpt")
    assert "optimizer_states" not in checkpoint and set(model_weights(checkpoint)) == set(
        ranks[0]["straight"]["weights"]
    )


@pytest.mark.slow
def test_train_py_trains_scores_and_samples_under_fsdp(tmp_path):
    corpus, run_dir = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    mp.spawn(_train_main, args=(_free_port(), corpus, run_dir), nprocs=2, join=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 5
    curve = {
        int(line.split(",")[0]): float(line.split(",")[-1])
        for line in (run_dir / "curve.csv").read_text().splitlines()[1:]
    }
    assert list(curve) == [STOP, 5]  # validated every 3 steps, and at the last step
    best = metrics["best_step"]
    assert curve[best] == min(curve.values())
    assert metrics["val/bpb"] == pytest.approx(curve[best], abs=1e-5)  # the sharded best checkpoint scored again
    assert len((run_dir / "sample.txt").read_text()) >= 20  # sample.max_new_tokens=20 characters
    assert is_sharded(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_activation_checkpointing_recomputes_the_fsdp_units_and_trains_as_without(tmp_path):
    """Applied inside the model, around each block: under FSDP those blocks are the shard units, whose
    weights are gathered again for the recompute. Same losses at every step, dropout included."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    mp.spawn(_checkpointing_main, args=(_free_port(), corpus, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["units"] and all(result["units"])
        assert sorted(result["losses"][True]) == list(range(1, STEPS + 1))
        for step, loss in result["losses"][False].items():
            assert result["losses"][True][step] == pytest.approx(loss, abs=1e-6), step

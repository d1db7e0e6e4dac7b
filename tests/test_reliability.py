"""Fault injection: interrupted writes, NaN losses, paths that try to escape the run directory."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.callbacks import NonFiniteLossGuard
from lmlab.checkpoint.atomic_io import AtomicCheckpointIO
from lmlab.errors import ConfigError, DivergedError, RunInterrupted
from lmlab.io import atomic_open, atomic_write_json, safe_output_path
from lmlab.run.dirs import ClaimFreshDirs
from lmlab.run.train import train
from lmlab.task import LanguageModelTask
from tests.helpers import REPO, compose_config, tiny_overrides

pytestmark = pytest.mark.reliability


class PauseAtStep(pl.Callback):
    """Test-only: before optimizer step `step`, write `marker` and wait (up to `seconds`) for `release`
    to exist, so a test can signal or kill a real training process at a known point."""

    def __init__(self, step: int, marker: str, release: str = "", seconds: float = 120) -> None:
        self.step, self.marker, self.release, self.seconds = step, Path(marker), Path(release), seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.touch()
        deadline = time.monotonic() + self.seconds
        while not (self.release.name and self.release.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"status": "completed"})
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b'{"status": "compl')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert leftovers(tmp_path) == []


def test_a_checkpoint_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "weights": torch.ones(1000)}, path)
    unpicklable = {"global_step": 8, "weights": torch.zeros(1000), "bad": lambda: None}
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint(unpicklable, path)
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert leftovers(path.parent) == []


KILLED_WRITER = """
import sys, torch
from lmlab.checkpoint.atomic_io import AtomicCheckpointIO
io, big = AtomicCheckpointIO(), torch.randn(4_000_000)
for step in range(10_000):
    io.save_checkpoint({"global_step": step, "weights": big}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_saves_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let it finish a few 16 MB saves, then kill it during the next one
            writer.stdout.readline()
    finally:
        writer.kill()
        writer.wait()
    assert torch.load(path, weights_only=True)["weights"].numel() == 4_000_000
    assert all(name.startswith(".last.ckpt.") for name in leftovers(tmp_path))  # only the hidden temp file


def test_a_run_writes_checkpoints_through_the_atomic_plugin(tmp_path, small_corpus):
    cfg = compose_config(tiny_overrides("gpt", small_corpus, steps=6), tmp_path / "run")
    train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"last.ckpt", "best-step6.ckpt"}
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6
    assert leftovers(checkpoints) == []


def poison_loss_from(monkeypatch, step: int) -> None:
    """Make the training loss NaN from optimizer step `step` on (0-based), as a diverging run would."""
    clean = LanguageModelTask.training_step

    def training_step(self, batch, batch_idx):
        loss = clean(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= step else loss

    monkeypatch.setattr(LanguageModelTask, "training_step", training_step)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, small_corpus, monkeypatch):
    poison_loss_from(monkeypatch, step=6)
    run = tmp_path / "run"
    cfg = compose_config(tiny_overrides("gpt", small_corpus, steps=20) + ["trainer.val_check_interval=4"], run)
    expected = r"the training loss became nan at step 7; the last good checkpoint is .*last\.ckpt"
    with pytest.raises(DivergedError, match=expected):
        train(cfg)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # validation and the save at step 8 never ran
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "nan at step 7" in metrics["error"]


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    guard = NonFiniteLossGuard()
    trainer = SimpleNamespace(global_step=3, checkpoint_callbacks=[], default_root_dir=str(tmp_path), world_size=1)
    guard.on_save_checkpoint(trainer, None, {"state_dict": {"w": torch.ones(2), "steps": torch.tensor([1])}})
    with pytest.raises(DivergedError, match=r"weights became NaN or infinite by step 3 \(w\)"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": {"w": torch.tensor([1.0, math.inf])}})


def test_a_huge_learning_rate_fails_with_one_line_and_a_failed_metrics_json(tmp_path, small_corpus):
    run = tmp_path / "run"
    args = tiny_overrides("gpt", small_corpus, steps=20) + [
        "task.optimizer.lr=1e30",
        f"hydra.run.dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the training loss became nan at step" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("name", ["../escaped", "/etc/passwd", "a/../../b", "~/x"])
def test_names_from_configs_cannot_leave_their_folder(tmp_path, name):
    with pytest.raises(ConfigError, match="outside"):
        safe_output_path(tmp_path / "run", name, "output")


def test_names_inside_the_folder_are_allowed(tmp_path):
    assert safe_output_path(tmp_path, "checkpoints/../samples/a.txt") == (tmp_path / "samples" / "a.txt").resolve()


@pytest.mark.parametrize(
    "override",
    [
        "callbacks.model_checkpoint.filename=../../stolen",
        "callbacks.model_checkpoint.dirpath=/tmp/elsewhere",
        "callbacks.last_checkpoint.filename=../../stolen",
        "callbacks.validation_curve.path=../curve.csv",
        "logger.tensorboard.save_dir=/tmp",
        "logger.tensorboard.name=../../events",
    ],
)
def test_checkpoint_paths_cannot_escape_the_run_directory(tmp_path, small_corpus, override):
    cfg = compose_config(tiny_overrides("gpt", small_corpus, steps=2) + [override], tmp_path / "run")
    with pytest.raises(ConfigError, match="outside") as err:
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    if override.startswith("callbacks.") and "checkpoint" in override:
        assert override.split("=")[0] in str(err.value)  # the message names the key to change


class SignalAtStep(pl.Callback):
    """Test-only: send this process `signum` before optimizer step `step`, as a job scheduler would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint_and_restores_the_handlers(tmp_path, small_corpus):
    run = tmp_path / "run"
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    cfg = compose_config(
        tiny_overrides("gpt", small_corpus, steps=20)
        + [
            "+callbacks.signal._target_=tests.test_reliability.SignalAtStep",
            "+callbacks.signal.step=3",
            f"+callbacks.signal.signum={int(signal.SIGTERM)}",
        ],
        run,
    )
    expected = r"^SIGTERM at step 4: saved .*last\.ckpt; resume by running the same command with ckpt_path="
    with pytest.raises(RunInterrupted, match=expected):
        train(cfg)
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 4
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert {signum: signal.getsignal(signum) for signum in before} == before


def train_command(corpus: Path, cache: Path, *extra: str) -> list[str]:
    """`python train.py` on 30 tiny steps, validating (and so checkpointing) every 5."""
    return [
        sys.executable,
        "train.py",
        *tiny_overrides("gpt", corpus, steps=30),
        "trainer.val_check_interval=5",
        "model.dropout=0.1",
        "seed=5",
        f"paths.cache_dir={cache}",
        *extra,
    ]


def pause_at(step: int, marker: Path, release: Path | None = None) -> list[str]:
    return [
        "+callbacks.pause._target_=tests.test_reliability.PauseAtStep",
        f"+callbacks.pause.step={step}",
        f"+callbacks.pause.marker={marker}",
        f"+callbacks.pause.release={release or ''}",
    ]


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def final_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for timing in ("wall_time_s", "cpu_time_s"):  # how long it took differs; what it computed may not
        metrics.pop(timing)
    return metrics


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_corpus) -> dict:
    """The metrics of the 30-step run, trained without a break: what every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(train_command(small_corpus, root / "cache", f"hydra.run.dir={root / 'run'}"))
    metrics = final_metrics(root / "run")
    assert metrics["status"] == "completed" and metrics["steps"] == 30
    return metrics


def test_a_killed_run_resumes_in_its_directory_to_exactly_the_uninterrupted_result(
    tmp_path, small_corpus, uninterrupted
):
    run, marker = tmp_path / "run", tmp_path / "paused"
    command = train_command(small_corpus, tmp_path / "cache", f"hydra.run.dir={run}", *pause_at(12, marker))
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, process)
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup, nothing flushed
        process.communicate()
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 10
    assert not (run / "metrics.json").exists()

    run_to_end(command)  # the same command again: the unfinished run in that directory resumes
    assert final_metrics(run) == uninterrupted  # same steps, tokens, val/test loss: exactly, on CPU
    info = json.loads((run / "run_info.json").read_text())
    assert info["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and len(info["earlier_starts"]) == 1


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_with_one_line(tmp_path, small_corpus, uninterrupted):
    run, marker, release = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    command = train_command(small_corpus, tmp_path / "cache", f"hydra.run.dir={run}", *pause_at(12, marker, release))
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(marker, process)
    process.send_signal(signal.SIGINT)
    release.touch()
    _, stderr = process.communicate(timeout=240)

    assert process.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    last = run / "checkpoints" / "last.ckpt"
    assert errors == [
        f"error: SIGINT at step 13: saved {last}; resume by running the same command with ckpt_path={last}"
    ]
    assert "Traceback" not in stderr
    assert checkpoint_step(last) == 13  # the step that was running finished first
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"

    run_to_end([sys.executable, "train.py", f"ckpt_path={last}"])  # the checkpoint knows the rest of the config
    assert final_metrics(run) == uninterrupted
    assert json.loads((run / "run_info.json").read_text())["resumed_from"] == str(last)


def test_a_finished_run_directory_is_never_trained_over(tmp_path, small_corpus):
    run = tmp_path / "run"
    cfg = compose_config(tiny_overrides("gpt", small_corpus, steps=4), run)
    train(cfg)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=4) + ["seed=2"], run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    script = "import sys; from lmlab.run.dirs import claim_fresh_dir; print(claim_fresh_dir(sys.argv[1]))"
    default = str(tmp_path / "2026-01-01_00-00-00_gpt-char")
    processes = [
        subprocess.Popen([sys.executable, "-c", script, default], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    claimed = sorted(p.communicate()[0].strip() for p in processes)
    assert claimed == [default, f"{default}-2", f"{default}-3"]
    assert all(Path(d).is_dir() for d in claimed)


def hydra_dirs(tmp_path: Path, ckpt_path: str | None = None) -> DictConfig:
    """The `hydra.run`/`hydra.sweep` settings of conf/train.yaml, under tmp_path, in a fixed second."""
    dirs = OmegaConf.to_container(OmegaConf.create((REPO / "conf" / "train.yaml").read_text()).hydra, resolve=False)
    run, sweep = (
        dirs[key]["dir"]
        .replace("outputs/", f"{tmp_path}/outputs/")
        .replace("${now:%Y-%m-%d_%H-%M-%S}", "2026-01-01_00-00-00")
        for key in ("run", "sweep")
    )
    return OmegaConf.create(
        {
            "ckpt_path": ckpt_path,
            "hydra": {
                "run": {"dir": run},
                "sweep": {"dir": sweep},
                "runtime": {"choices": {"model": "gpt", "tokenizer": "char"}},
            },
        }
    )


def test_default_directories_are_claimed_when_hydra_starts_and_not_before(tmp_path):
    first = hydra_dirs(tmp_path)
    default = first.hydra.run.dir
    assert default == f"{tmp_path}/outputs/runs/2026-01-01_00-00-00_gpt-char"
    assert not Path(default).exists()  # reading the config (or merging over it) creates nothing
    Path(default).mkdir(parents=True)  # another run took the name first
    ClaimFreshDirs().on_run_start(first)
    assert first.hydra.run.dir == first.hydra.run.dir == f"{default}-2"  # Hydra reads it more than once
    ClaimFreshDirs().on_multirun_start(first)
    assert Path(first.hydra.sweep.dir).is_dir()


def test_a_resumed_run_keeps_its_directory(tmp_path):
    run = tmp_path / "outputs" / "runs" / "earlier"
    (run / "checkpoints").mkdir(parents=True)
    cfg = hydra_dirs(tmp_path, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    ClaimFreshDirs().on_run_start(cfg)
    assert cfg.hydra.run.dir == str(run) and sorted(p.name for p in run.parent.iterdir()) == ["earlier"]

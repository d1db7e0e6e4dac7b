"""Fault injection: interrupted writes, NaN losses, paths that try to escape the run directory."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.callbacks import NonFiniteLossGuard
from lmlab.checkpoint.atomic_io import AtomicCheckpointIO
from lmlab.errors import ConfigError, DiskFull, DivergedError, RunInterrupted
from lmlab.io import atomic_open, atomic_write_json, safe_output_path
from lmlab.run.dirs import ClaimFreshDirs
from lmlab.run.train import train
from lmlab.task import LanguageModelTask
from tests.commands import StartedCommand, run_command, start_command
from tests.helpers import REPO, SHAKESPEARE, compose_command, compose_config, tiny_overrides
from tests.outcomes import check_outcome

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
    result = run_command([sys.executable, "train.py", *args], cwd=REPO, timeout=300)
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
    check_outcome(f"a file location outside the run directory: `{override}`", str(err.value))


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
    result = run_command(command, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_for(path: Path, process: StartedCommand, seconds: float = 240) -> None:
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
    process = start_command(command, cwd=REPO)
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
    process = start_command(command, cwd=REPO)
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
    with pytest.raises(ConfigError, match="already holds a finished run") as raised:
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=4) + ["seed=2"], run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    check_outcome("`hydra.run.dir` of a finished run", str(raised.value))


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


# --- Issue 31: a checkpoint never runs code, a cache never lies, a run directory has one writer ---


def crafted(trained_run: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of the trained run's last.ckpt whose lmlab section `change(section)` edited (its
    tensors, and so their stored hash, untouched): what an attacker or a damaged disk could hand over."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    change(checkpoint["lmlab"])
    path = tmp_path / "given" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def payload(target: Path) -> dict:
    """A config node that, if instantiated, writes `target`: a .pth file on sys.path would run at the next start."""
    return {"_target_": "lmlab.io.atomic_write_text", "path": str(target), "text": "import os"}


def test_a_checkpoints_callbacks_are_not_built_on_resume(trained_run, tmp_path, small_corpus):
    """Defect 1: callbacks come from this command line; a crafted (or once added) callbacks.x is dropped."""
    pwned = tmp_path / "pwned.pth"
    path = crafted(
        trained_run, tmp_path, "callbacks.ckpt", lambda s: s["resume_config"].update(callbacks={"x": payload(pwned)})
    )
    metrics = train(compose_config([f"ckpt_path={path}", "trainer.max_steps=22"], tmp_path / "run"))
    assert metrics["steps"] == 22 and not pwned.exists()
    check_outcome(
        "a checkpoint whose resume config holds a callback writing a .pth file (`ckpt_path=`)",
        "resumed and trained to step 22; callbacks come from the command line, the checkpoint's was never built",
    )


def with_node(place: str, node) -> callable:
    def change(section: dict) -> None:
        parent, _, leaf = place.rpartition(".")
        tree = section["resume_config"]
        for key in parent.split("."):
            tree = tree.setdefault(key, {})
        tree[leaf] = node

    return change


@pytest.mark.parametrize(
    "place,node,message",
    [
        ("trainer.plugins", "payload-list", "sets trainer.plugins to a list of config nodes"),
        ("task._target_", "lmlab.io.atomic_write_text", "sets task._target_='lmlab.io.atomic_write_text'"),
        ("data.extra", "payload", "sets data.extra._target_="),
        ("trainer.strategy", "payload", "sets trainer.strategy to a config node"),
    ],
)
def test_a_crafted_resume_config_is_refused_in_one_line_and_runs_nothing(trained_run, tmp_path, place, node, message):
    """Defect 1, through ckpt_path= and through the automatic resume of a run directory."""
    pwned = tmp_path / "pwned.pth"
    node = {"payload": payload(pwned), "payload-list": [payload(pwned)]}.get(node, node)
    path = crafted(trained_run, tmp_path, "crafted.ckpt", with_node(place, node))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
    for overrides in ([f"ckpt_path={path}"], []):  # explicit, then the unfinished run found in its directory
        with pytest.raises(ConfigError, match=re.escape(message)) as raised:
            train(compose_config(overrides, run))
        assert "\n" not in str(raised.value) and not pwned.exists()
    check_outcome(
        f"a checkpoint whose resume config sets `{place}` to an object (`ckpt_path=`, or rerun in its directory)",
        str(raised.value),
    )


def test_a_crafted_group_choice_cannot_point_hydra_at_another_file(trained_run, tmp_path):
    path = crafted(trained_run, tmp_path, "choice.ckpt", lambda s: s["choices"].update(trainer="../../../tmp/evil"))
    with pytest.raises(
        ConfigError, match=r"chose trainer='\.\./\.\./\.\./tmp/evil', which this lmlab's conf/trainer/"
    ) as raised:
        train(compose_config([f"ckpt_path={path}"], tmp_path / "run"))
    check_outcome("a checkpoint whose config group choice is a path (`trainer=../../../tmp/evil`)", str(raised.value))


def test_init_from_builds_lmlab_models_only(trained_run, tmp_path, small_corpus):
    """Defect 1 through fine-tuning: the model node is checked as generate.py checks it."""
    pwned = tmp_path / "pwned.pth"
    path = crafted(trained_run, tmp_path, "model.ckpt", lambda s: s["model"].update(payload(pwned)))
    with pytest.raises(
        ConfigError, match="model _target_ 'lmlab.io.atomic_write_text' is not an lmlab language model"
    ) as raised:
        train(compose_config([f"init_from={path}", "data=text", f"data.path={small_corpus}"], tmp_path / "run"))
    assert not pwned.exists()
    check_outcome("a checkpoint whose model `_target_` writes a file (`init_from=`)", str(raised.value))


def test_a_resume_takes_the_checkpoints_settings_and_this_command_lines(trained_run, tmp_path):
    """The plain settings still come from the checkpoint (the original command line need not be repeated)."""
    from lmlab.checkpoint.resume import start_from_checkpoint

    last = trained_run / "checkpoints" / "last.ckpt"
    cfg, start = start_from_checkpoint(compose_config([f"ckpt_path={last}", "trainer.max_steps=40"], tmp_path / "run"))
    assert start.resume and cfg.trainer.max_steps == 40 and cfg.data.block_size == 32 and cfg.model.d_model == 32
    assert cfg.trainer.precision == "32-true" and cfg.names.model == "gpt"
    assert cfg.trainer.plugins[0]["_target_"] == "lmlab.checkpoint.atomic_io.AtomicCheckpointIO"  # from conf/


def damage_cache(entry: Path, how: str) -> None:
    """One way an entry's files can be damaged after it was written (the audit's list)."""
    if how == "val.bin cut to half":
        data = (entry / "val.bin").read_bytes()
        (entry / "val.bin").write_bytes(data[: len(data) // 2])
    elif how == "train.bin cut to half":
        data = (entry / "train.bin").read_bytes()
        (entry / "train.bin").write_bytes(data[: len(data) // 2])
    elif how == "odd-length val.bin":
        (entry / "val.bin").write_bytes((entry / "val.bin").read_bytes()[:-1])
    elif how == "empty train.bin":
        (entry / "train.bin").write_bytes(b"")
    elif how == "meta.json cut short":
        (entry / "meta.json").write_text((entry / "meta.json").read_text()[:40])
    elif how == "meta.json without token counts":
        meta = json.loads((entry / "meta.json").read_text())
        del meta["tokens"]
        (entry / "meta.json").write_text(json.dumps(meta))
    elif how == "tokenizer.json missing":
        (entry / "tokenizer.json").unlink()
    elif how == "id beyond the vocabulary":
        ids = bytearray((entry / "test.bin").read_bytes())
        ids[0:2] = (65000).to_bytes(2, "little")
        (entry / "test.bin").write_bytes(bytes(ids))
    else:
        raise AssertionError(how)


CACHE_DAMAGE = [
    "val.bin cut to half",
    "train.bin cut to half",
    "odd-length val.bin",
    "empty train.bin",
    "meta.json cut short",
    "meta.json without token counts",
    "tokenizer.json missing",
    "id beyond the vocabulary",
]


@pytest.fixture
def split_text():
    from lmlab.data.corpus import split_by_bytes

    return split_by_bytes(SHAKESPEARE_HEAD, [0.9, 0.05, 0.05])


SHAKESPEARE_HEAD = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]


@pytest.mark.parametrize("how", CACHE_DAMAGE)
def test_a_damaged_token_cache_entry_is_rebuilt_with_a_notice(tmp_path, split_text, caplog, how):
    """Defect 2: a damaged entry is never used; the rebuilt one holds exactly the ids of a fresh build."""
    from lmlab.data.cache import tokenize_with_cache
    from lmlab.tokenizers import CharTokenizer

    fresh = tokenize_with_cache("c", split_text, [0.9, 0.05, 0.05], CharTokenizer(), tmp_path)
    expected = {split: np.array(ids) for split, ids in fresh.ids.items()}
    damage_cache(fresh.path, how)
    with caplog.at_level("WARNING", logger="lmlab.data.cache"):
        again = tokenize_with_cache("c", split_text, [0.9, 0.05, 0.05], CharTokenizer(), tmp_path)
    assert all(np.array_equal(again.ids[split], expected[split]) for split in expected)
    assert again.split_bytes == fresh.split_bytes
    notices = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(notices) == 1 and notices[0].endswith(": rebuilding it") and "\n" not in notices[0]
    check_outcome(f"a token cache entry with {how}", "notice: " + notices[0].replace(str(tmp_path), "/x"))


def test_a_truncated_validation_cache_no_longer_halves_the_score(tmp_path, small_corpus):
    """Defect 2 end to end: the audit's val/bpb 2.75 instead of 5.52 from a val.bin cut to half."""
    overrides = tiny_overrides("gpt", small_corpus, steps=4)
    first = train(compose_config(overrides, tmp_path / "first"))
    (entry,) = (tmp_path / "cache").glob("*-char-*")
    damage_cache(entry, "val.bin cut to half")
    second = train(compose_config(overrides, tmp_path / "second"))
    assert second["val/bpb"] == first["val/bpb"] and second["test/bpb"] == first["test/bpb"]
    check_outcome(
        "a run on a token cache whose val.bin was cut to half",
        "the entry is rebuilt with a notice; val/bpb and test/bpb equal those of the intact cache",
    )


class PowerCut(BaseException):
    """The process stops dead (not an Exception: nothing may catch it as an error)."""


def test_a_power_cut_between_a_cache_write_and_its_fsync_leaves_no_entry(tmp_path, split_text, monkeypatch):
    """Cut at the fsync of meta.json (the last file): the entry is not in place, and the next run builds it."""
    from lmlab.data import cache
    from lmlab.tokenizers import CharTokenizer

    synced = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 4:  # train.bin, val.bin, test.bin, then meta.json
            raise PowerCut

    monkeypatch.setattr(cache.os, "fsync", fsync)
    with pytest.raises(PowerCut):
        cache.tokenize_with_cache("c", split_text, [0.9, 0.05, 0.05], CharTokenizer(), tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.undo()
    built = cache.tokenize_with_cache("c", split_text, [0.9, 0.05, 0.05], CharTokenizer(), tmp_path)
    assert built.split_tokens["val"] > 0 and oct(built.path.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
    check_outcome(
        "a power cut between a token cache write and its fsync",
        "no entry is left in place (only a hidden temporary folder); the next run builds it, with the umask's modes",
    )


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "tokenizer,message",
    [
        ("/dev/zero", "is not an lmlab tokenizer: it is not JSON"),
        (
            '{"format": "lmlab-tokenizer/2", "config": {"name": "sentencepiece"}, "state": {}}',
            "names tokenizer 'sentencepiece'",
        ),
        ('{"format": "lmlab-tokenizer/2", "config": {"name": "char"}, "state": {}}', "is a damaged char tokenizer"),
    ],
)
def test_a_checkpoints_tokenizer_is_read_as_json_only(trained_run, tmp_path, tokenizer, message):
    """Defect 3: a string that is not JSON is not taken for a path (/dev/zero would read until OOM)."""
    from lmlab.checkpoint import load_checkpoint

    path = crafted(trained_run, tmp_path, "tokenizer.ckpt", lambda s: s.update(tokenizer=tokenizer))
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_checkpoint(path)
    assert "\n" not in str(raised.value)
    check_outcome(f"a checkpoint whose tokenizer is `{tokenizer[:60]}`", str(raised.value))


def test_a_fifo_named_as_a_checkpoints_tokenizer_does_not_hang_generate(trained_run, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = crafted(trained_run, tmp_path, "fifo.ckpt", lambda s: s.update(tokenizer=str(fifo)))
    result = run_command(
        [sys.executable, "generate.py", f"ckpt={path}", "max_new_tokens=5"],
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("is not an lmlab tokenizer: it is not JSON")
    check_outcome("a checkpoint whose tokenizer names a FIFO (`generate.py`)", result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s["model"].pop("vocab_size"), "its model config has no valid vocab_size (got None)"),
        (lambda s: s.pop("tokenizer"), "lacks a valid 'tokenizer' entry"),
        (lambda s: s.update(config="x"), "lacks a valid 'config' entry"),
        (lambda s: s.update(step="ten"), "its step is 'ten'"),
    ],
)
def test_a_damaged_lmlab_section_is_refused_in_one_line(trained_run, tmp_path, change, message):
    from lmlab.checkpoint import load_checkpoint

    path = crafted(trained_run, tmp_path, "section.ckpt", change)
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_checkpoint(path)
    assert "\n" not in str(raised.value)
    check_outcome(f"a checkpoint whose lmlab section is damaged ({message.split(' (')[0]})", str(raised.value))


def sharded_folder(path: Path, step: int) -> None:
    """A complete sharded checkpoint's files, as far as the swap's recovery looks at them."""
    path.mkdir(parents=True)
    torch.save({"global_step": step}, path / "meta.pt")
    (path / ".metadata").write_bytes(b"index")


@pytest.mark.parametrize("left", [("saving", "old"), ("old",), ("saving",)])
def test_an_fsdp_swap_killed_between_its_renames_is_restored(tmp_path, left):
    """Defect 4: killed between `last.ckpt -> .old` and `.saving -> last.ckpt`, the rerun resumes
    from the newest whole state instead of starting over (and deleting both)."""
    from lmlab.checkpoint.resume import continue_unfinished_run

    checkpoints = tmp_path / "run" / "checkpoints"
    for suffix, step in (("saving", 20), ("old", 10)):
        if suffix in left:
            sharded_folder(checkpoints / f"last.ckpt.{suffix}", step)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}, "ckpt_path": None, "init_from": None})
    resumed = continue_unfinished_run(cfg)
    assert resumed.ckpt_path == str(checkpoints / "last.ckpt")
    expected = 20 if "saving" in left else 10
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == expected
    check_outcome(
        f"an FSDP run killed during its checkpoint swap, leaving {' and '.join(f'last.ckpt.{x}' for x in left)}",
        f"the rerun restores last.ckpt from last.ckpt.{'saving' if 'saving' in left else 'old'} with a notice and resumes",
    )


def test_a_half_written_fsdp_save_is_not_restored(tmp_path):
    from lmlab.checkpoint.resume import recover_interrupted_swap

    staging = tmp_path / "last.ckpt.saving"
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"partial")  # killed before meta.pt and the index
    assert not recover_interrupted_swap(tmp_path / "last.ckpt") and not (tmp_path / "last.ckpt").exists()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lmlab.run.dirs import RunDirLock
with RunDirLock() as lock:
    lock.acquire(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_on_a_run_directory_is_refused_naming_the_holder(tmp_path, small_corpus):
    """Defect 5: two processes on one hydra.run.dir (or a SLURM requeue while the old job runs)."""
    import socket

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as raised:
            train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), run))
    finally:
        holder.kill()
        holder.wait()
    assert str(raised.value) == (
        f"{run} is in use by another run (PID {holder.pid} on {socket.gethostname()}): wait for it to end, "
        "or give this run its own directory (leave hydra.run.dir unset)"
    )
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the second run was written
    check_outcome(
        "a second run on a run directory in use (same `hydra.run.dir`, or a SLURM requeue)", str(raised.value)
    )
    assert train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), run))["status"] == "completed"  # freed


def flip_a_weight_byte(source: Path, target: Path) -> None:
    """Flip one bit inside a weight tensor's bytes in the file itself, as a bad disk would."""
    raw = bytearray(source.read_bytes())
    weights = torch.load(source, weights_only=True)["state_dict"]
    tensor = next(t for t in weights.values() if t.is_floating_point() and t.numel() >= 64)
    at = bytes(raw).find(tensor.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 9] ^= 0x10
    target.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_checkpoint_are_refused(trained_run, tmp_path):
    """Defect 6: every checkpoint train.py writes stores its tensors' hash, checked on load."""
    from lmlab.checkpoint import load_checkpoint, read_checkpoint

    flipped = tmp_path / "flipped.ckpt"
    flip_a_weight_byte(trained_run / "checkpoints" / "last.ckpt", flipped)
    with pytest.raises(ConfigError, match="its tensors no longer match the hash stored when it was written") as raised:
        load_checkpoint(flipped)
    check_outcome("a checkpoint with a flipped bit in its weights", str(raised.value))
    with pytest.raises(ConfigError, match="no longer match the hash"):
        train(compose_config([f"ckpt_path={flipped}"], tmp_path / "run"))
    assert read_checkpoint(flipped, verify_hash=False)["global_step"] == 20  # verify_checkpoint_hash=false


def train_from(ckpt: Path, switch: list[str], tmp_path: Path) -> None:
    """train.py init_from=CKPT (train.py ckpt_path= reads it the same way, lmlab.checkpoint.resume)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20_000])
    overrides = [*tiny_overrides("gpt", corpus, steps=2), f"init_from={ckpt}", *switch]
    assert train(compose_config(overrides, tmp_path / "run"))["status"] == "completed"


def evaluate_text(ckpt: Path, switch: list[str], tmp_path: Path) -> None:
    """evaluate.py ckpt=CKPT data.path=FILE."""
    from lmlab.run.evaluate import evaluate_from_config

    (tmp_path / "text.txt").write_text(SHAKESPEARE.read_text()[:1000])
    overrides = [f"ckpt={ckpt}", f"data.path={tmp_path / 'text.txt'}", "device=cpu", f"output={tmp_path / 'e.json'}"]
    assert evaluate_from_config(compose_command("evaluate", [*overrides, *switch]))["step"] == 20


def evaluate_harness_tasks(ckpt: Path, switch: list[str], tmp_path: Path) -> None:
    """evaluate.py ckpt=CKPT harness.tasks=[...] (lm-evaluation-harness through evaluate.py)."""
    pytest.importorskip("lm_eval")
    from lmlab.harness.run import harness_from_config

    tasks = REPO / "tests" / "assets" / "harness"
    overrides = [f"ckpt={ckpt}", "harness.tasks=[lmlab_tiny_rolling]", f"harness.include_path={tasks}"]
    overrides += ["harness.limit=1", "device=cpu", f"output={tmp_path / 'h.json'}"]
    assert harness_from_config(compose_command("evaluate", [*overrides, *switch]))["step"] == 20


def harness_model_args(ckpt: Path, switch: list[str], tmp_path: Path) -> None:
    """python -m lmlab.harness run --model lmlab --model_args ckpt=CKPT[,verify_checkpoint_hash=...]"""
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    import lmlab.harness  # noqa: F401  (registers the model `lmlab`, as python -m lmlab.harness does)

    lm = get_model("lmlab").create_from_arg_string(",".join([f"ckpt={ckpt}", *switch]), {"device": "cpu"})
    assert lm.loaded.step == 20


def generate_text(ckpt: Path, switch: list[str], tmp_path: Path) -> None:
    """generate.py ckpt=CKPT."""
    from lmlab.generate import generate_from_config

    overrides = [f"ckpt={ckpt}", "max_new_tokens=4", "device=cpu", f"output={tmp_path / 'g.json'}"]
    generate_from_config(compose_command("generate", [*overrides, *switch]))
    assert json.loads((tmp_path / "g.json").read_text())["step"] == 20


def export_model_dir(ckpt: Path, switch: list[str], tmp_path: Path) -> None:
    """export.py ckpt=CKPT out=FOLDER."""
    from lmlab.export import export_from_config

    out = export_from_config(compose_command("export", [f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", *switch]))
    assert (out / "config.json").is_file()


# Every command that reads a checkpoint; each takes the switch as `verify_checkpoint_hash=...` (a
# Hydra override, or one of the harness's --model_args).
READERS = {
    "train.py": train_from,
    "evaluate.py": evaluate_text,
    "evaluate.py harness.tasks": evaluate_harness_tasks,
    "python -m lmlab.harness": harness_model_args,
    "generate.py": generate_text,
    "export.py": export_model_dir,
}
# lm_eval indexes its few thousand task files before the checkpoint is read: about 10 s per call here
COMMANDS = [pytest.param(c, marks=pytest.mark.slow) if c == "evaluate.py harness.tasks" else c for c in READERS]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_altered_tensors_unless_verify_checkpoint_hash_is_false(trained_run, tmp_path, command):
    """The hash is checked by default wherever a checkpoint is read, and `verify_checkpoint_hash=false`
    (for very large files) reaches the read in every command."""
    read = READERS[command]
    flipped = tmp_path / "flipped.ckpt"
    flip_a_weight_byte(trained_run / "checkpoints" / "last.ckpt", flipped)
    with pytest.raises(ConfigError, match="its tensors no longer match the hash stored when it was written") as raised:
        read(flipped, [], tmp_path)
    check_outcome("a checkpoint with a flipped bit in its weights", str(raised.value))
    read(flipped, ["verify_checkpoint_hash=false"], tmp_path)  # loads: the altered weights are used as they are


@pytest.mark.parametrize("command", COMMANDS)
def test_a_verify_checkpoint_hash_that_is_not_true_or_false_is_refused(trained_run, tmp_path, command):
    with pytest.raises(ConfigError, match=re.escape("verify_checkpoint_hash='off' is not true or false")) as raised:
        READERS[command](trained_run / "checkpoints" / "last.ckpt", ["verify_checkpoint_hash=off"], tmp_path)
    check_outcome("`verify_checkpoint_hash=off` (not true or false)", str(raised.value))


def test_non_finite_weights_are_refused_at_load(trained_run, tmp_path):
    from lmlab.checkpoint import load_checkpoint
    from lmlab.checkpoint.format import tensors_sha256

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k, t in checkpoint["state_dict"].items() if t.is_floating_point())
    checkpoint["state_dict"][name][0] = float("nan")
    checkpoint["lmlab"]["tensors_sha256"] = tensors_sha256(checkpoint)  # a whole file, of a diverged state
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(ConfigError, match=re.escape(f"holds NaN or infinite weights ({name})")) as raised:
        load_checkpoint(tmp_path / "nan.ckpt")
    check_outcome("a checkpoint holding NaN weights", str(raised.value))


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_says_so_in_one_line(
    tmp_path, small_corpus, monkeypatch
):
    """Defect 7: the second save (step 20) finds the disk full."""
    from lmlab.checkpoint import atomic_io

    saves, save = [], torch.save

    def fill_up(obj, f):
        saves.append(1)
        if len(saves) > 2:  # last.ckpt and best-step10.ckpt fit, then the disk is full
            f.write(b"partial")
            no_space()
        save(obj, f)

    monkeypatch.setattr(atomic_io.torch, "save", fill_up)
    run = tmp_path / "run"
    with pytest.raises(DiskFull) as raised:
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=20), run))
    monkeypatch.undo()
    assert str(raised.value).startswith("no space left on the device writing ") and "\n" not in str(raised.value)
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 10 and leftovers(run / "checkpoints") == []
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == str(raised.value)
    check_outcome("a full disk when a checkpoint is saved", f"{raised.value} (metrics.json: status failed)")


def test_a_full_disk_at_metrics_json_ends_in_one_line(tmp_path, small_corpus, monkeypatch):
    from lmlab.run import train as train_module

    def full(path, obj):
        with atomic_open(path) as f:
            f.write(b"{")
            no_space()

    monkeypatch.setattr(train_module, "atomic_write_json", full)
    run = tmp_path / "run"
    with pytest.raises(DiskFull, match=r"^no space left on the device writing .*metrics\.json: the previous") as raised:
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), run))
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 4 and leftovers(run) == []
    check_outcome("a full disk when metrics.json is written", str(raised.value))


def test_a_full_disk_while_caching_tokens_ends_in_one_line_and_leaves_no_entry(tmp_path, small_corpus, monkeypatch):
    from lmlab.data import cache

    def encode(tokenizer, pieces, out, dtype, advance):
        out.write(b"\x00" * 10)
        no_space()

    monkeypatch.setattr(cache, "_encode_split", encode)
    run = tmp_path / "run"
    with pytest.raises(DiskFull, match=r"^no space left on the device writing the token cache in .*: free") as raised:
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), run))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["corpus-hashes", "locks"]  # no entry, no temp
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    check_outcome("a full disk while the token cache is written", f"{raised.value} (metrics.json: status failed)")


def test_sigterm_during_data_preparation_stops_in_one_line(tmp_path, small_corpus, monkeypatch):
    from lmlab.data import cache

    encode = cache._encode_split

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return encode(*args)

    monkeypatch.setattr(cache, "_encode_split", terminated)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted, match=r"^SIGTERM outside the training steps: stopped") as raised:
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), run))
    assert "\n" not in str(raised.value)
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["corpus-hashes", "locks"]
    assert {signum: signal.getsignal(signum) for signum in before} == before
    check_outcome(
        "SIGTERM while the corpus is tokenized and cached", f"{raised.value} (metrics.json: status interrupted)"
    )


class SignalAtTest(pl.Callback):
    """Test-only: SIGTERM when the final test pass starts."""

    def on_test_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_final_test_pass_stops_in_one_line(tmp_path, small_corpus, monkeypatch):
    calls = []
    for method in ("validate", "test"):
        original = getattr(pl.Trainer, method)

        def spy(self, *args, _original=original, _name=method, **kwargs):
            calls.append((_name, kwargs.get("weights_only")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pl.Trainer, method, spy)
    run = tmp_path / "run"
    overrides = tiny_overrides("gpt", small_corpus, steps=4) + [
        "+callbacks.term._target_=tests.test_reliability.SignalAtTest"
    ]
    with pytest.raises(RunInterrupted, match=r"^SIGTERM outside the training steps: stopped") as raised:
        train(compose_config(overrides, run))
    check_outcome("SIGTERM during the final test pass", f"{raised.value} (metrics.json: status interrupted)")
    assert calls and all(weights_only is True for _, weights_only in calls)  # explicit, whatever the environment
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 4


def test_a_run_directory_with_checkpoints_but_no_last_ckpt_is_refused(tmp_path, small_corpus):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best-step4.ckpt").write_bytes(b"another run's")
    with pytest.raises(ConfigError, match="holds another run's checkpoints but no last.ckpt") as raised:
        train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), run))
    check_outcome("`hydra.run.dir` holding checkpoints but no `last.ckpt`", str(raised.value))


def test_an_older_checkpoints_plain_table_is_taken_where_conf_now_computes_it(trained_run, tmp_path):
    """adamw_lr was a table in conf/train.yaml and is now a resolver: a checkpoint that stored the
    table still resumes (a plain mapping, no key that builds an object)."""
    from lmlab.checkpoint.resume import start_from_checkpoint

    table = {"gpt": 4.0e-3, "lstm": 1.2e-2}
    path = crafted(trained_run, tmp_path, "table.ckpt", lambda s: s["resume_config"].update(adamw_lr=table))
    cfg, _ = start_from_checkpoint(compose_config([f"ckpt_path={path}"], tmp_path / "run"))
    assert cfg.adamw_lr == table

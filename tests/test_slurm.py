"""SLURM through Hydra's submitit launcher: the `hydra/launcher=slurm` preset composes with what a user sets
and becomes the sbatch script SLURM would run; launchers at odds with the Trainer end in one line; a real
2-job sweep runs through `submitit_local` (CI has no SLURM), and a requeued job resumes from last.ckpt.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from unittest import mock

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lmlab.errors import ConfigError
from lmlab.models import GPT
from lmlab.run.distributed import check_distributed
from tests.commands import run_command
from tests.helpers import CONF, REPO, compose_config

USER_SETTINGS = [
    "hydra/launcher=slurm",
    "trainer=ddp",
    "trainer.devices=8",
    "trainer.num_nodes=2",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.account=lm-team",
    "hydra.launcher.timeout_min=1440",
    "hydra.launcher.mem_gb=480",
    "+hydra.launcher.additional_parameters.mail-type=END",
]


def _composed(overrides: list[str], tmp_path: Path) -> tuple[DictConfig, DictConfig]:
    """The run's config, and the whole config with its `hydra` node, as `train.py -m OVERRIDES` composes them."""
    overrides = [*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    cfg = compose_config(overrides, tmp_path / "run")  # also makes its hydra node this process's HydraConfig
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return cfg, compose(config_name="train", overrides=overrides, return_hydra_config=True)


class Submitted(Exception):
    """Raised in place of sbatch: carries the executor the launcher built."""


def test_slurm_preset_becomes_the_sbatch_script_a_user_expects(tmp_path, monkeypatch):
    srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor looks for srun on PATH; it is never run here
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    cfg, full = _composed(USER_SETTINGS, tmp_path)
    launcher = instantiate(full.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=full)

    def capture(executor, *args, **kwargs):
        raise Submitted(executor)

    with mock.patch.object(submitit.AutoExecutor, "map_array", capture), pytest.raises(Submitted) as sent:
        launcher.launch([["model=gpt"]], initial_job_idx=0)
    executor = sent.value.args[0]._executor
    script = executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for flag in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--account=lm-team",
        "--time=1440",
        "--mem=480GB",
        "--mail-type=END",
        "--signal=USR2@120",  # submitit checkpoints and requeues on this warning before the time limit
    ):
        assert f"#SBATCH {flag}\n" in script, flag
    assert executor.max_num_timeout == 5  # requeued up to 5 times after a timeout
    check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))  # consistent: no error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["hydra.launcher.tasks_per_node=4"],
            r"tasks_per_node=4 but trainer.devices=8: .*set hydra.launcher.tasks_per_node=8",
        ),
        (["hydra.launcher.nodes=4"], r"nodes=4 but trainer.num_nodes=2: set both"),
        (["trainer.devices=auto", "hydra.launcher.tasks_per_node=8"], r"trainer.devices=auto under SLURM: set"),
        (["hydra.launcher.gpus_per_node=null"], r"gpus_per_node=None leaves 8 GPU tasks per node without GPUs"),
    ],
    ids=["tasks", "nodes", "auto-devices", "no-gpus"],
)
def test_slurm_launcher_at_odds_with_the_trainer_is_one_line(tmp_path, overrides, message):
    cfg, _ = _composed([*USER_SETTINGS, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))
    assert "\n" not in str(err.value)


def test_plain_submitit_slurm_defaults_are_named_with_their_fix(tmp_path):
    cfg, _ = _composed(["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4"], tmp_path)
    with pytest.raises(ConfigError, match=r"hydra.launcher.tasks_per_node=1 but trainer.devices=4"):
        check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))


def test_submitit_local_with_several_tasks_is_refused(tmp_path):
    cfg, _ = _composed(["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"], tmp_path)
    with pytest.raises(ConfigError, match="Lightning starts a local run's processes itself"):
        check_distributed(cfg, GPT(40, d_model=16, n_layer=1, n_head=2, block_size=8))


# --- a real sweep through submitit (slow) ---

STEPS = 4


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("submitit")
    corpus = root / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    sweep = root / "multirun"
    overrides = [
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "model.d_model=16,24",
        "model.n_layer=1",
        "model.n_head=2",
        "data=text",
        f"data.path={corpus}",
        "data.block_size=16",
        "data.batch_size=4",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "task.scheduler.warmup_steps=1",
        "sample.max_new_tokens=8",
        "~callbacks.progress_bar",
        f"paths.cache_dir={root / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=job${hydra.job.num}",
    ]
    result = run_command([sys.executable, "train.py", "-m", *overrides], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def _jobs(sweep: Path) -> list[Path]:
    return sorted(path.parent for path in sweep.glob("*/metrics.json"))


@pytest.mark.slow
def test_a_two_job_sweep_runs_through_submitit(local_sweep):
    jobs = _jobs(local_sweep)
    assert [job.name for job in jobs] == ["job0", "job1"]
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["steps"] == STEPS, metrics
        assert (job / "checkpoints" / "last.ckpt").is_file()
    submissions = sorted(local_sweep.glob(".submitit/*/*_submitted.pkl"))
    assert len(submissions) == 2  # each job went through submitit, in its own process
    assert (local_sweep / "comparison.csv").read_text().count("completed") == 2


@pytest.mark.slow
def test_a_requeued_job_resumes_from_last_ckpt(local_sweep):
    """A requeue runs the pickled submission again: same job, same directory. Here the job's run is left
    unfinished (as a timeout after its last checkpoint would leave it) and its submission run again."""
    job = local_sweep / "job0"  # model.d_model=16
    (job / "metrics.json").unlink()
    submission = next(
        path
        for path in local_sweep.glob(".submitit/*/*_submitted.pkl")
        if "model.d_model=16" in pickle.loads(path.read_bytes()).args[0]
    )
    delayed = pickle.loads(submission.read_bytes())
    executor = submitit.LocalExecutor(folder=local_sweep / ".submitit" / "requeued")
    executor.update_parameters(timeout_min=5)
    executor.submit(delayed.function, *delayed.args, **delayed.kwargs).result()
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == STEPS
    log = (job / "train.log").read_text()
    assert "holds an unfinished run: resuming it from" in log and str(job / "checkpoints" / "last.ckpt") in log

"""Sweeps that finish themselves: a killed sweep rerun trains only what is missing; grids extend at their edges."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.run.sweep_resume import REQUESTED, continue_job, settings_differences, unfinished_sweep
from tests.commands import run_command, start_command
from tests.helpers import REPO, sweep_overrides


def sweep_command(corpus: Path, parent: Path, swept: list[str], *extra: str) -> list[str]:
    """A tiny sweep whose directory is a default one (claimed by lmlab, so a rerun can find it)."""
    overrides = [o for o in sweep_overrides(corpus, parent / "sweep", swept) if not o.startswith("hydra.sweep.dir=")]
    return [
        sys.executable,
        "train.py",
        "-m",
        *overrides,
        *extra,
        f"hydra.sweep.dir=${{lmlab_fresh_dir:{parent}/sweep}}",
    ]


def statuses(sweep: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text()).get("status") for p in sweep.glob("*/metrics.json")}


@pytest.mark.slow
@pytest.mark.reliability
def test_a_killed_sweep_rerun_trains_only_the_missing_jobs_and_reports_them_all(tmp_path, small_corpus):
    command = sweep_command(small_corpus, tmp_path, ["model=gpt,lstm,rnn"])
    sweep = tmp_path / "sweep"
    first = start_command(command, cwd=REPO)
    deadline = time.monotonic() + 300
    while "completed" not in statuses(sweep).values() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # the launcher and the job it is running, mid-way
    first.wait()
    done = {
        name: (sweep / name / "metrics.json").stat().st_mtime_ns
        for name, s in statuses(sweep).items()
        if s == "completed"
    }
    assert len(done) == 1 and not (sweep / "comparison.md").exists()

    rerun = run_command(command, cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"continuing the unfinished sweep {sweep}" in rerun.stdout
    assert not (tmp_path / "sweep-2").exists()
    assert statuses(sweep) == {"model=gpt": "completed", "model=lstm": "completed", "model=rnn": "completed"}
    for name, mtime in done.items():  # reused, not trained again
        assert (sweep / name / "metrics.json").stat().st_mtime_ns == mtime
    assert (sweep / "comparison.md").read_text().count("| completed |") == 3
    assert unfinished_sweep(tmp_path, OmegaConf.load(sweep / "multirun.yaml")) is None  # finished: never continued


@pytest.mark.slow
def test_extend_grid_adds_rates_beyond_an_edge_until_the_cap(tmp_path, small_corpus):
    command = sweep_command(
        small_corpus, tmp_path, ["task.optimizer.lr=1e-5,3e-5"], "sweep.extend_grid=true", "sweep.max_extra_runs=2"
    )
    result = run_command(command, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = sorted(
        float(o.split("=")[1])
        for p in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml")
        for o in yaml.safe_load(p.read_text())
        if o.startswith("task.optimizer.lr=")
    )
    assert rates == [1e-5, 3e-5, 9e-5, 2.7e-4]  # 10 steps at 3e-5 beat 1e-5: the grid grows upwards, twice
    assert (tmp_path / "sweep" / "comparison.md").read_text().count("| completed |") == 4


def job_config(run_dir: Path, **values) -> OmegaConf:
    return OmegaConf.create({"paths": {"output_dir": str(run_dir)}, "seed": 1, **values})


def test_a_job_reuses_a_completed_run_with_the_same_settings_and_refuses_changed_ones(tmp_path):
    cfg = job_config(tmp_path)
    assert continue_job(cfg) is None and (tmp_path / REQUESTED).is_file()
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "val/bpb": 2.5}))
    assert continue_job(cfg)["val/bpb"] == 2.5
    with pytest.raises(ConfigError, match=r"sweep job .* other settings \(seed: 1 -> 2\)"):
        continue_job(job_config(tmp_path, seed=2))


def test_a_failed_job_is_set_aside_and_trained_again(tmp_path):
    cfg = job_config(tmp_path)
    continue_job(cfg)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert continue_job(cfg) is None
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()
    assert (tmp_path / ".attempts" / "1" / "metrics.json").is_file()


def test_a_sweep_whose_settings_changed_is_not_continued(tmp_path):
    sweep = tmp_path / "a"
    sweep.mkdir()
    config = OmegaConf.create({"seed": 1, "hydra": {"overrides": {"task": ["model=gpt,lstm"]}}})
    OmegaConf.save(config, sweep / "multirun.yaml")
    assert unfinished_sweep(tmp_path, config) == sweep
    assert unfinished_sweep(tmp_path, OmegaConf.merge(config, {"seed": 2})) is None
    other = OmegaConf.merge(config, {"hydra": {"overrides": {"task": ["model=gpt"]}}})
    assert unfinished_sweep(tmp_path, other) is None
    assert settings_differences({"a": {"b": 1}}, {"a": {"b": 2}}) == ["a.b: 1 -> 2"]


@pytest.mark.slow
def test_local_gpus_spreads_the_jobs_over_the_gpus_it_is_given(tmp_path, small_corpus):
    """On any machine: the jobs train on the CPU, and each is pinned to one of the 'GPUs' named."""
    command = sweep_command(
        small_corpus,
        tmp_path,
        ["model=gpt,lstm"],
        "hydra/launcher=local_gpus",
        "hydra.launcher.gpus=[0,1]",
        "hydra.launcher.jobs_per_gpu=1",
    )
    result = run_command(command, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert statuses(sweep) == {"model=gpt": "completed", "model=lstm": "completed"}
    pinned = {
        p.parent.parent.name: yaml.safe_load(p.read_text())["hydra"]["job"]["env_set"]["CUDA_VISIBLE_DEVICES"]
        for p in sweep.glob("*/.hydra/hydra.yaml")
    }
    assert set(pinned.values()) == {"0", "1"}  # both used, each job on one
    assert (sweep / "comparison.md").read_text().count("| completed |") == 2


@pytest.mark.slow
@pytest.mark.reliability
def test_a_killed_optuna_search_rerun_reuses_its_finished_trials(tmp_path, small_corpus):
    """The seeded sampler asks the same trials again: finished ones are reused, the search completes."""
    command = sweep_command(
        small_corpus, tmp_path, ["hparams_search=optuna"], "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1"
    )
    sweep = tmp_path / "sweep"
    first = start_command(command, cwd=REPO)
    deadline = time.monotonic() + 300
    while "completed" not in statuses(sweep).values() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-3000:]  # still searching when it is killed
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = {
        name: (sweep / name / "metrics.json").stat().st_mtime_ns
        for name, s in statuses(sweep).items()
        if s == "completed"
    }
    rerun = run_command(command, cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"continuing the unfinished sweep {sweep}" in rerun.stdout
    assert list(statuses(sweep).values()) == ["completed"] * 3  # n_trials in all, not 3 more
    for name, mtime in done.items():  # the same trial asked again, its result reused
        assert (sweep / name / "metrics.json").stat().st_mtime_ns == mtime
    assert (sweep / "optimization_results.yaml").is_file()

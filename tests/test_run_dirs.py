"""Sweep job folders: short, safe and unique whatever the overrides, with the full overrides kept."""

from __future__ import annotations

import sys

import yaml

from lmlab.run.dirs import MAX_JOB_DIR, job_dir_name
from tests.commands import run_command
from tests.helpers import REPO


def test_plain_overrides_name_the_folder_as_they_are():
    assert job_dir_name("model=gpt,tokenizer=bpe", 3) == "model=gpt,tokenizer=bpe"


def test_long_or_unsafe_overrides_give_short_safe_unique_names():
    many = ",".join(f"model.setting_{i}=0.{i}23456789" for i in range(8))
    names = {job_dir_name(many, 0), job_dir_name(many + "1", 1), job_dir_name("data.path=/some/folder", 2)}
    assert len(names) == 3
    assert all(len(name) <= MAX_JOB_DIR and "/" not in name for name in names)
    assert job_dir_name("data.path=/some/folder", 2).startswith("data.path=_some_folder")


def test_a_sweep_over_long_overrides_and_paths_writes_flat_folders(tmp_path):
    sweep = tmp_path / "sweep"
    missing = tmp_path / "no" / "such" / "folder"
    overrides = ["-m", "data=text", f"data.path={missing},{missing}2", f"hydra.sweep.dir={sweep}"]
    overrides += [f"+tag{i}=a_rather_long_value_{i}" for i in range(6)]  # the jobs fail fast: no such corpus
    result = run_command([sys.executable, "train.py", *overrides], cwd=REPO, timeout=300)
    assert "File name too long" not in result.stderr and "Traceback" not in result.stderr
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert len(jobs) == 2 and all(len(job.name) <= MAX_JOB_DIR for job in jobs)
    recorded = yaml.safe_load((jobs[0] / ".hydra" / "overrides.yaml").read_text())
    assert f"data.path={missing}" in recorded or f"data.path={missing}2" in recorded  # the full overrides are kept

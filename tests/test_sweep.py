"""Multiruns end with a comparison: report files, fair budgets, failures, Optuna, recipes (dashboards: test_dashboards.py)."""

from __future__ import annotations

import csv
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmlab.errors import RunInterrupted
from lmlab.io import atomic_write_json
from tests.commands import run_command
from tests.helpers import CONF, REPO, SWEEP_BYTES, SWEEP_PARAMS, sweep_overrides

RUNS = ["model=gpt,tokenizer=bpe", "model=gpt,tokenizer=char", "model=lstm,tokenizer=bpe", "model=lstm,tokenizer=char"]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def report_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "comparison.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_sweep_ends_with_a_comparison(tiny_sweep):
    rows = report_rows(tiny_sweep)
    assert sorted(row["run"] for row in rows) == RUNS  # readable names: only what the sweep varies
    assert all(row["status"] == "completed" for row in rows)
    bpb = [float(row["test/bpb"]) for row in rows]
    assert bpb == sorted(bpb)
    markdown = (tiny_sweep / "comparison.md").read_text()
    assert "| run | model | tokenizer |" in markdown and markdown.count("| completed |") == 4
    for png in ("learning_curves.png", "bpb_by_model.png"):
        assert (tiny_sweep / png).read_bytes().startswith(b"\x89PNG")
    for run in RUNS:
        assert (tiny_sweep / run / "metrics.json").is_file()
        assert len((tiny_sweep / run / "curve.csv").read_text().splitlines()) >= 2  # header and a validation


@pytest.mark.slow
def test_char_and_bpe_runs_read_the_same_text_within_one_batch(tiny_sweep):
    for model in ("gpt", "lstm"):
        char, bpe = (metrics(tiny_sweep / f"model={model},tokenizer={tok}") for tok in ("char", "bpe"))
        per_step = {tok: m["bytes_seen"] / m["steps"] for tok, m in (("char", char), ("bpe", bpe))}
        assert bpe["steps"] < char["steps"]  # BPE tokens hold more bytes, so fewer steps read the same text
        assert abs(char["bytes_seen"] - bpe["bytes_seen"]) <= max(per_step.values())
        for tok, m in (("char", char), ("bpe", bpe)):
            assert abs(m["bytes_seen"] - SWEEP_BYTES) <= per_step[tok] / 2 + 1


@pytest.mark.slow
def test_runs_are_parameter_matched(tiny_sweep):
    for run in RUNS:
        assert abs(metrics(tiny_sweep / run)["params"] / SWEEP_PARAMS - 1) < 0.10, run
        model = yaml.safe_load((tiny_sweep / run / "config.yaml").read_text())["model"]
        assert "target_params" not in model  # config.yaml rebuilds the model as it ran, at the chosen width
    assert len({yaml.safe_load((tiny_sweep / run / "config.yaml").read_text())["model"]["d_model"] for run in RUNS}) > 1


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_sweep_goes_on(tmp_path, small_corpus):
    sweep = tmp_path / "multirun"
    overrides = sweep_overrides(small_corpus, sweep, ["model=gpt", "model.n_layer=1,0"])
    result = run_command([sys.executable, "train.py", "-m", *overrides], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: invalid model config: n_layer must be >= 1 (got 0): set model.n_layer to a positive integer"
    ]
    rows = {row["run"]: row for row in report_rows(sweep)}
    assert rows["model.n_layer=1"]["status"] == "completed"
    assert rows["model.n_layer=0"]["status"] == "failed"
    assert rows["model.n_layer=0"]["error"].startswith("invalid model config: n_layer must be >= 1")
    assert "| failed |" in (sweep / "comparison.md").read_text()


def test_an_unexpected_crash_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import lmlab.run.train

    def train_or_crash(cfg):
        if cfg.names.model == "lstm":
            raise RuntimeError("CUDA out of memory\nTried to allocate ...")
        atomic_write_json(
            Path(cfg.paths.output_dir) / "metrics.json",
            {"model": "gpt", "tokenizer": "char", "test/bpb": 2.0, "status": "completed"},
        )
        return {"val/bpb": 2.0}

    monkeypatch.setattr(lmlab.run.train, "train", train_or_crash)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model=gpt,lstm", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    GlobalHydra.instance().clear()
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")  # the sweep, in this process, with train() patched
    rows = {row["run"]: row for row in report_rows(tmp_path / "sweep")}
    assert rows["model=gpt"]["status"] == "completed"
    assert (rows["model=lstm"]["status"], rows["model=lstm"]["error"]) == ("failed", "RuntimeError: CUDA out of memory")


def test_an_interrupt_stops_the_whole_sweep(tmp_path, monkeypatch):
    import lmlab.run.train

    started = []

    def interrupted(cfg):
        started.append(cfg.names.model)
        raise RunInterrupted("SIGINT at step 3: saved last.ckpt")

    monkeypatch.setattr(lmlab.run.train, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model=gpt,lstm", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert stopped.value.code == 130 and started == ["gpt"]
    assert metrics(tmp_path / "sweep" / "model=gpt")["status"] == "interrupted"


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, small_corpus):
    sweep = tmp_path / "optuna"
    overrides = sweep_overrides(
        small_corpus,
        sweep,
        ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "model.d_model=choice(16,32)"],
        ("model=gpt",),
    )
    result = run_command([sys.executable, "train.py", *overrides], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"task.optimizer.lr", "model.dropout", "model.d_model"}
    rows = report_rows(sweep)
    assert len(rows) == 2 and all(row["status"] == "completed" for row in rows)
    assert math.isclose(best["best_value"], min(float(row["val/bpb"]) for row in rows), rel_tol=1e-6)


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("recipe", ["compare_architectures", "compare_architectures_gpu"])
def test_comparison_recipes_tune_every_model_and_tokenizer_fairly(recipe):
    cfg = _compose_with_hydra([f"experiment={recipe}"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params.model.split(",") == [
        "rnn",
        "gru",
        "lstm",
        "lstm_attn",
        "transformer",
        "gpt",
        "llama",
        "mamba",
        "mamba2",
        "jamba",
    ]  # every registered family
    assert params.tokenizer.split(",") == ["char", "word", "bpe"]
    grid = [float(lr) for lr in params["task.optimizer.lr"].split(",")]
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert 3 <= len(grid) <= 5 and all(2.5 < r < 4 for r in ratios)  # log-spaced, half a decade apart
    assert cfg.budget.target_params > 0 and cfg.budget.max_bytes > 0
    assert cfg.callbacks.test_blocks._target_ == "lmlab.callbacks.SaveTestBlocks"


@pytest.mark.parametrize("recipe", ["scaling", "scaling_gpu"])
def test_scaling_recipes_sweep_matched_sizes_per_architecture_at_equal_compute(recipe):
    cfg = _compose_with_hydra([f"experiment={recipe}"])
    params = cfg.hydra.sweeper.params
    assert "tokenizer" not in params and cfg.hydra.runtime.choices.tokenizer == "char"  # one tokenizer
    sizes = [int(n) for n in params["budget.target_params"].split(",")]
    assert 3 <= len(sizes) <= 4 and sizes == sorted(sizes)
    assert len(params.model.split(",")) >= 4
    assert cfg.budget.max_flops > 0 and cfg.budget.max_bytes is None


@pytest.mark.slow
def test_the_scaling_recipe_runs_on_a_tiny_budget_and_draws_the_frontier(tmp_path, small_corpus):
    sweep = tmp_path / "scaling"
    max_flops = 4e9
    result = run_command(
        [
            sys.executable,
            "train.py",
            "experiment=scaling",
            "model=gpt,lstm",
            "budget.target_params=20000,40000",
            f"budget.max_flops={max_flops}",
            "model.n_layer=1",
            "data=text",
            f"data.path={small_corpus}",
            "data.block_size=32",
            "data.batch_size=8",
            "trainer.max_steps=7",  # replaced by the FLOPs budget's steps
            "trainer.val_check_interval=10",
            "task.scheduler.warmup_steps=2",
            "sample.max_new_tokens=10",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [path.parent for path in sweep.rglob("metrics.json")]
    assert len(runs) == 4
    for run in runs:
        m = metrics(run)
        assert m["status"] == "completed" and m["torch_threads"] == 1
        assert m["steps"] == round(max_flops / (m["flops_per_token"] * 8 * 32))  # the budget set the steps
        assert m["train_flops"] == pytest.approx(max_flops, rel=0.5 / m["steps"] + 1e-9)
        with (run / "curve.csv").open() as f:
            curve = list(csv.DictReader(f))
        assert all(float(row["train_flops"]) == int(row["tokens_seen"]) * m["flops_per_token"] for row in curve)
        assert 0 < float(curve[-1]["train_flops"]) <= m["train_flops"]
        assert (run / "test_blocks.npz").is_file()
    assert (sweep / "compute_frontier.png").is_file()
    markdown = (sweep / "comparison.md").read_text()
    assert "![compute frontier](compute_frontier.png)" in markdown
    # two sizes at one budget: the fits say in one line why none applies, and the comparison stands
    assert "## Scaling-law fits\n\nNot fitted: no scaling law fits these runs" in markdown


def test_the_optuna_recipe_tunes_lr_dropout_and_width_against_val_bpb():
    cfg = _compose_with_hydra(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"task.optimizer.lr", "model.dropout", "model.d_model"}

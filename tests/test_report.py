"""The sweep report (lmlab.report, compare.py) on hand-written run directories: no training needed."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.report import find_runs, group_rows, read_curve, run_rows, write_report
from lmlab.report.blocks import BLOCKS_FILE
from lmlab.report.plots import frontier, learning_curves
from lmlab.report.sweep import check_grids
from lmlab.report.tuning import choose_learning_rates
from tests.commands import run_command
from tests.helpers import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(
    sweep: Path,
    name: str,
    *,
    model: str,
    tokenizer: str,
    seed: int = 1,
    test_bpb: float | None = None,
    status: str = "completed",
    error: str | None = None,
    lr: float = 1e-3,
    unk_rate: float = 0.0,
    val_bpb: float | None = None,
    flops_per_token: int = 0,
    block_nats: np.ndarray | None = None,
) -> Path:
    """A run directory as train.py leaves it: config.yaml, metrics.json (unless still running) and curve.csv."""
    run = sweep / name
    run.mkdir(parents=True)
    config = {
        "seed": seed,
        "model": {"_target_": f"lmlab.models.{model}"},
        "task": {"optimizer": {"lr": lr}},
        "names": {"model": model, "tokenizer": tokenizer},
        "paths": {"output_dir": str(run)},
        "trainer": {"default_root_dir": str(run)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if status == "incomplete":
        return run
    metrics = {"model": model, "tokenizer": tokenizer, "status": status}
    if error:
        metrics["error"] = error
    if test_bpb is not None:
        metrics.update(
            {
                "val/loss": 1.0,
                "val/ppl": 2.7,
                "val/bpb": test_bpb + 0.01 if val_bpb is None else val_bpb,
                "test/loss": 1.0,
                "test/ppl": 2.7,
                "test/bpb": test_bpb,
                "test/unk_rate": unk_rate,
                "best_step": 10,
                "params": 1000,
                "tokens_seen": 5000,
                "bytes_seen": 5000,
                "wall_time_s": 3.0,
            }
        )
        (run / "curve.csv").write_text(
            "step,tokens_seen,bytes_seen,train_flops,time_s,val/loss,val/ppl,val/bpb\n"
            f"5,2500,2500,{2500 * flops_per_token},1.0,1.5,4.5,{test_bpb + 0.5}\n"
            f"10,5000,5000,{5000 * flops_per_token},2.0,1.0,2.7,{test_bpb + 0.01}\n"
        )
    if block_nats is not None:
        np.savez(
            run / BLOCKS_FILE,
            nats=block_nats,
            bytes=np.full(len(block_nats), 500),
            tokens=np.full(len(block_nats), 500),
            text_sha256=np.asarray("same text"),
            block_chars=np.asarray(512),
        )
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    """gpt x char over two seeds, lstm x char over two seeds, a failed and a still-running job."""
    root = tmp_path / "sweep"
    fake_run(root, "model=gpt,seed=1,trainer.max_steps=10", model="gpt", tokenizer="char", seed=1, test_bpb=2.0)
    fake_run(root, "model=gpt,seed=2,trainer.max_steps=10", model="gpt", tokenizer="char", seed=2, test_bpb=2.2)
    fake_run(root, "model=lstm,seed=1,trainer.max_steps=10", model="lstm", tokenizer="char", seed=1, test_bpb=1.5)
    fake_run(root, "model=lstm,seed=2,trainer.max_steps=10", model="lstm", tokenizer="char", seed=2, test_bpb=1.9)
    fake_run(
        root,
        "model=rnn,seed=1,trainer.max_steps=10",
        model="rnn",
        tokenizer="char",
        seed=1,
        status="failed",
        error="n_layer must be >= 1 (got 0) | set model.n_layer",
    )
    fake_run(root, "model=gru,seed=1,trainer.max_steps=10", model="gru", tokenizer="char", seed=1, status="incomplete")
    (root / "model=gpt,seed=1,trainer.max_steps=10" / ".hydra").mkdir()
    (root / "model=gpt,seed=1,trainer.max_steps=10" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    return root


def test_one_row_per_run_best_first_and_unfinished_runs_last(sweep):
    rows = run_rows(find_runs([sweep]))
    assert [row["run"] for row in rows] == [
        "model=lstm,seed=1",
        "model=lstm,seed=2",
        "model=gpt,seed=1",
        "model=gpt,seed=2",
        "model=gru,seed=1",
        "model=rnn,seed=1",
    ]
    assert [row["status"] for row in rows[-2:]] == ["incomplete", "failed"]
    assert rows[-1]["error"].startswith("n_layer must be >= 1")


def test_labels_drop_the_settings_every_run_shares(sweep):
    runs = find_runs([sweep])
    assert all("trainer.max_steps" not in run.label for run in runs)
    assert all("trainer.max_steps=10" in run.name for run in runs)


def test_repeats_are_grouped_by_configuration_with_mean_and_std(sweep):
    groups = {row["configuration"]: row for row in group_rows(find_runs([sweep]))}
    assert set(groups) == {"model=gpt", "model=lstm", "model=rnn", "model=gru"}
    lstm = groups["model=lstm"]
    assert lstm["runs"] == "2/2" and lstm["seeds"] == "1 2"
    assert lstm["test/bpb_mean"] == pytest.approx(1.7)
    assert lstm["test/bpb_std"] == pytest.approx(statistics.stdev([1.5, 1.9]))
    assert groups["model=rnn"]["runs"] == "0/1"
    assert list(groups)[:2] == ["model=lstm", "model=gpt"]  # best mean first


def test_configurations_differing_beyond_the_seed_are_not_grouped(tmp_path):
    fake_run(tmp_path, "a", model="gpt", tokenizer="char", seed=1, test_bpb=2.0, lr=1e-3)
    fake_run(tmp_path, "b", model="gpt", tokenizer="char", seed=2, test_bpb=2.0, lr=3e-3)
    assert len(group_rows(find_runs([tmp_path]))) == 2


def test_report_files(sweep):
    report = write_report([sweep], sweep)
    names = {path.name for path in report.files}
    assert names == {
        "comparison.csv",
        "comparison.md",
        "comparison_by_configuration.csv",
        "learning_curves.png",
        "bpb_by_model.png",
    }
    for png in ("learning_curves.png", "bpb_by_model.png"):
        assert (sweep / png).read_bytes().startswith(PNG_MAGIC)
    with (sweep / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["test/bpb"] == "1.5" and rows[-1]["status"] == "failed"
    markdown = (sweep / "comparison.md").read_text()
    assert "## Mean ± std over seeds" in markdown
    assert "| model=lstm | lstm | char | 2/2 | 1 2 |" in markdown
    assert "1.7000 ± 0.2828" in markdown
    assert "n_layer must be >= 1 (got 0) \\| set model.n_layer" in markdown  # a pipe cannot break the table


def test_no_mean_std_section_without_repeats(tmp_path):
    fake_run(tmp_path, "model=gpt", model="gpt", tokenizer="char", test_bpb=2.0)
    fake_run(tmp_path, "model=lstm", model="lstm", tokenizer="char", test_bpb=1.5)
    report = write_report([tmp_path], tmp_path)
    assert "Mean ± std" not in report.markdown
    assert not (tmp_path / "comparison_by_configuration.csv").exists()


def test_unknown_words_are_flagged_because_they_flatter_bits_per_byte(tmp_path):
    fake_run(tmp_path, "model=gpt,tokenizer=char", model="gpt", tokenizer="char", test_bpb=2.0)
    assert "unk rate" not in write_report([tmp_path], tmp_path).markdown
    fake_run(tmp_path, "model=gpt,tokenizer=word", model="gpt", tokenizer="word", test_bpb=1.7, unk_rate=0.0312)
    markdown = write_report([tmp_path], tmp_path).markdown
    assert "| test unk rate |" in markdown and "| 0.0312 |" in markdown
    assert "bits per byte are optimistic" in markdown


def test_a_curve_cut_short_by_a_crash_keeps_its_whole_lines(tmp_path):
    run = fake_run(tmp_path, "r", model="gpt", tokenizer="char", test_bpb=2.0)
    with (run / "curve.csv").open("a") as f:
        f.write("10,5000,5000,0,2.0,1.0,2.7,1.9\n15,7500,75")  # step 10 again (a resume), then a torn line
    points = read_curve(run)
    assert [p["step"] for p in points] == [5, 10]
    assert points[-1]["val/bpb"] == 1.9


def test_single_run_directories_and_several_sweeps_can_be_compared(tmp_path):
    one = fake_run(tmp_path / "s1", "model=gpt", model="gpt", tokenizer="char", test_bpb=2.0)
    fake_run(tmp_path / "s2", "model=gpt", model="gpt", tokenizer="bpe", test_bpb=1.0)
    assert [run.name for run in find_runs([one])] == ["model=gpt"]
    labels = sorted(run.label for run in find_runs([tmp_path / "s1", tmp_path / "s2"]))
    assert labels == ["s1/model=gpt", "s2/model=gpt"]


def test_a_grid_split_over_two_sweeps_is_one_choice_named_without_the_sweeps(tmp_path):
    for sweep, lr, val_bpb in (("gpu0", 1e-3, 2.1), ("more", 3e-2, 2.0)):
        name = f"model=gru,tokenizer=char,task.optimizer.lr={lr}"
        fake_run(tmp_path / sweep, name, model="gru", tokenizer="char", lr=lr, val_bpb=val_bpb, test_bpb=val_bpb)
    (choice,) = choose_learning_rates(find_runs([tmp_path / "gpu0", tmp_path / "more"]))
    assert choice.grid == (1e-3, 3e-2) and choice.lr == 3e-2
    assert choice.name == "gru, char"


def test_nothing_to_compare_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no runs under"):
        find_runs([tmp_path])
    with pytest.raises(ConfigError, match="is not a directory"):
        find_runs([tmp_path / "missing"])


def test_compare_py_writes_the_report_and_prints_the_table(sweep, tmp_path):
    out = tmp_path / "out"
    result = run_command(
        [sys.executable, "compare.py", str(sweep), "--out", str(out)],
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model=lstm,seed=1 | lstm | char |" in result.stdout
    assert (out / "comparison.md").is_file() and (out / "bpb_by_model.png").is_file()


def test_compare_py_reports_a_bad_path_in_one_line(tmp_path):
    result = run_command([sys.executable, "compare.py", str(tmp_path / "nope")], cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def _grid(root: Path, model: str, scores: dict[float, tuple[float, float]], tokenizer: str = "char") -> None:
    """One run per learning rate: {lr: (val bpb, test bpb)}."""
    for lr, (val, test) in scores.items():
        name = f"model={model},tokenizer={tokenizer},task.optimizer.lr={lr}"
        fake_run(root, name, model=model, tokenizer=tokenizer, lr=lr, val_bpb=val, test_bpb=test)


def test_each_pair_gets_the_learning_rate_with_the_best_validation_score(tmp_path):
    # gpt's best test score is at 1e-2, but the rate is chosen by validation: 3e-3
    _grid(tmp_path, "gpt", {1e-3: (2.0, 2.0), 3e-3: (1.8, 1.85), 1e-2: (1.9, 1.80)})
    _grid(tmp_path, "lstm", {1e-3: (2.2, 2.2), 3e-3: (2.1, 2.1), 1e-2: (1.7, 1.7)})
    choices = choose_learning_rates(find_runs([tmp_path]))
    assert [(c.model, c.lr) for c in choices] == [("lstm", 1e-2), ("gpt", 3e-3)]  # ranked by the chosen test bpb
    assert choices[1].mean("test/bpb") == 1.85 and choices[1].grid == (1e-3, 3e-3, 1e-2)
    markdown = write_report([tmp_path], tmp_path).markdown
    assert "## Learning rate chosen per model" in markdown
    assert "| 2 | gpt, char | 0.003 | 0.001 0.003 0.01 |  | 1.8000 | 1.8500 | 1 |" in markdown


def test_runs_made_under_different_default_rate_tables_stay_one_grid(tmp_path):
    _grid(tmp_path, "gpt", {1e-3: (2.0, 2.0), 3e-3: (1.8, 1.85)})
    config = tmp_path / "model=gpt,tokenizer=char,task.optimizer.lr=0.003" / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "adamw_lr": {"gpt": 1e-2}}))
    (choice,) = choose_learning_rates(find_runs([tmp_path]))  # the table acts only through lr, which differs anyway
    assert choice.grid == (1e-3, 3e-3) and choice.lr == 3e-3


def test_a_best_rate_at_the_edge_of_its_grid_is_flagged(tmp_path):
    _grid(tmp_path, "gpt", {1e-3: (2.0, 2.0), 3e-3: (1.8, 1.8), 1e-2: (1.9, 1.9)})
    _grid(tmp_path, "lstm", {1e-3: (2.2, 2.2), 3e-3: (2.1, 2.1), 1e-2: (1.7, 1.7)})
    _grid(tmp_path, "rnn", {1e-3: (2.0, 2.0), 3e-3: (2.3, 2.3), 1e-2: (2.9, 2.9)})
    edges = {c.model: c.edge for c in choose_learning_rates(find_runs([tmp_path]))}
    assert edges == {"gpt": "", "lstm": "highest", "rnn": "lowest"}
    markdown = write_report([tmp_path], tmp_path).markdown
    assert "at the highest rate: extend the grid" in markdown and "at the lowest rate: extend the grid" in markdown


def test_a_higher_rate_that_diverged_brackets_the_grid_and_a_crash_does_not(tmp_path):
    _grid(tmp_path / "a", "gru", {1e-3: (2.2, 2.2), 1e-2: (1.9, 1.9)})
    _grid(tmp_path / "b", "lstm", {1e-3: (2.2, 2.2), 1e-2: (1.9, 1.9)})
    nan = "the training loss became nan at step 190; the last good checkpoint is ..."
    for sweep, model, error in (("a", "gru", nan), ("b", "lstm", "CUDA out of memory")):
        name = f"model={model},tokenizer=char,task.optimizer.lr=0.03"
        fake_run(tmp_path / sweep, name, model=model, tokenizer="char", lr=3e-2, status="failed", error=error)
    edges = {c.model: (c.edge, c.failed) for c in choose_learning_rates(find_runs([tmp_path]))}
    assert edges == {"gru": ("", (3e-2,)), "lstm": ("highest", (3e-2,))}


def test_a_rate_whose_runs_all_failed_is_listed_but_never_chosen(tmp_path):
    _grid(tmp_path, "gpt", {1e-3: (2.0, 2.0), 3e-3: (1.8, 1.8)})
    fake_run(tmp_path, "model=gpt,task.optimizer.lr=0.01", model="gpt", tokenizer="char", lr=1e-2, status="failed")
    (choice,) = choose_learning_rates(find_runs([tmp_path]))
    assert choice.lr == 3e-3 and choice.failed == (1e-2,) and choice.edge == "highest"


def test_optimistic_runs_rank_below_every_run_that_pays_for_every_byte(tmp_path):
    fake_run(tmp_path, "model=gpt,tokenizer=char", model="gpt", tokenizer="char", test_bpb=2.0)
    fake_run(tmp_path, "model=gpt,tokenizer=word", model="gpt", tokenizer="word", test_bpb=1.5, unk_rate=0.06)
    runs = find_runs([tmp_path])
    rows = run_rows(runs)
    assert [(r["tokenizer"], r["scoring"]) for r in rows] == [("char", ""), ("word", "optimistic")]
    assert [c.tokenizer for c in choose_learning_rates(runs)] == ["char", "word"]
    markdown = write_report([tmp_path], tmp_path).markdown
    assert "| optimistic |" in markdown and "rank below every run that pays for every byte" in markdown
    labels = [t.get_text() for t in learning_curves(runs).axes[0].get_legend().get_texts()]
    assert labels == ["tokenizer=char", "tokenizer=word (optimistic)"]


def test_a_tuned_sweep_draws_the_learning_curves_of_each_pairs_chosen_rate_only(tmp_path):
    _grid(tmp_path, "gpt", {1e-3: (2.0, 2.0), 3e-3: (1.8, 1.8), 1e-2: (1.9, 1.9)})
    _grid(tmp_path, "lstm", {1e-3: (2.2, 2.2), 3e-3: (2.1, 2.1), 1e-2: (1.7, 1.7)})
    figure = learning_curves(find_runs([tmp_path]))
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["lstm, char (lr 0.01)", "gpt, char (lr 0.003)"]


def test_the_compute_frontier_is_the_lower_envelope_of_every_curve():
    points = [(1.0, 3.0), (2.0, 2.5), (2.0, 2.7), (3.0, 2.6), (4.0, 2.0), (5.0, float("nan")), (6.0, 2.1)]
    assert frontier(points) == [(1.0, 3.0), (2.0, 2.5), (4.0, 2.0)]


def test_the_report_plots_bpb_against_training_flops_when_curves_record_them(tmp_path):
    fake_run(tmp_path, "model=gpt", model="gpt", tokenizer="char", test_bpb=2.0)
    assert "compute_frontier.png" not in {p.name for p in write_report([tmp_path], tmp_path).files}
    fake_run(tmp_path, "model=lstm", model="lstm", tokenizer="char", test_bpb=2.0, flops_per_token=600_000)
    report = write_report([tmp_path], tmp_path)
    assert (tmp_path / "compute_frontier.png").read_bytes().startswith(PNG_MAGIC)
    assert "![compute frontier](compute_frontier.png)" in report.markdown


def test_the_report_says_which_differences_are_real(tmp_path):
    text = np.random.default_rng(0).gamma(4.0, 250.0, 200)
    noise = np.random.default_rng(1).normal(0.0, 5.0, 200)
    fake_run(tmp_path, "model=gpt", model="gpt", tokenizer="char", test_bpb=2.0, block_nats=text)
    fake_run(tmp_path, "model=llama", model="llama", tokenizer="char", test_bpb=2.001, block_nats=text + noise)
    fake_run(tmp_path, "model=lstm", model="lstm", tokenizer="char", test_bpb=2.1, block_nats=text * 1.05)
    fake_run(tmp_path, "model=rnn", model="rnn", tokenizer="char", test_bpb=2.2)  # no blocks (an older run)
    markdown = write_report([tmp_path], tmp_path).markdown
    assert "## Is the difference real?" in markdown and "the best, **gpt, char**" in markdown
    lines = {line.split(" | ")[0]: line for line in markdown.splitlines() if line.startswith("| ")}
    assert lines["| llama, char"].endswith("| not significant |")
    assert lines["| lstm, char"].endswith("| significant |")
    assert "no test_blocks.npz in its run directory" in lines["| rnn, char"]


@pytest.mark.parametrize("key", ["task.optimizer.lr", "budget.target_params"])
def test_an_empty_grid_is_one_line(key):
    recipe = OmegaConf.create({"hydra": {"sweeper": {"params": {key: ""}}, "overrides": {"task": []}}})
    with pytest.raises(ConfigError, match=f"the {key} grid is empty: give it at least one value"):
        check_grids(recipe)
    command_line = OmegaConf.create({"hydra": {"sweeper": {"params": {}}, "overrides": {"task": [f"{key}= "]}}})
    with pytest.raises(ConfigError, match=f"the {key} grid is empty"):
        check_grids(command_line)
    check_grids(OmegaConf.create({"hydra": {"sweeper": {"params": {key: "1,2"}}, "overrides": {"task": []}}}))

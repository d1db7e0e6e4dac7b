"""The sweep report (lmlab.report, compare.py) on hand-written run directories: no training needed."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmlab.errors import ConfigError
from lmlab.report import find_runs, group_rows, read_curve, run_rows, write_report
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
) -> Path:
    """A run directory as train.py leaves it: config.yaml, metrics.json (unless still running) and curve.csv."""
    run = sweep / name
    run.mkdir(parents=True)
    config = {
        "seed": seed,
        "model": {"_target_": f"lmlab.models.{model}"},
        "optimizer": {"lr": lr},
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
                "val/bpb": test_bpb + 0.01,
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
            "step,tokens_seen,bytes_seen,time_s,val/loss,val/ppl,val/bpb\n"
            f"5,2500,2500,1.0,1.5,4.5,{test_bpb + 0.5}\n"
            f"10,5000,5000,2.0,1.0,2.7,{test_bpb + 0.01}\n"
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
        f.write("10,5000,5000,2.0,1.0,2.7,1.9\n15,7500,75")  # step 10 again (a resume), then a torn line
    points = read_curve(run)
    assert [p["step"] for p in points] == [5, 10]
    assert points[-1]["val/bpb"] == 1.9


def test_single_run_directories_and_several_sweeps_can_be_compared(tmp_path):
    one = fake_run(tmp_path / "s1", "model=gpt", model="gpt", tokenizer="char", test_bpb=2.0)
    fake_run(tmp_path / "s2", "model=gpt", model="gpt", tokenizer="bpe", test_bpb=1.0)
    assert [run.name for run in find_runs([one])] == ["model=gpt"]
    labels = sorted(run.label for run in find_runs([tmp_path / "s1", tmp_path / "s2"]))
    assert labels == ["s1/model=gpt", "s2/model=gpt"]


def test_nothing_to_compare_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no runs under"):
        find_runs([tmp_path])
    with pytest.raises(ConfigError, match="is not a directory"):
        find_runs([tmp_path / "missing"])


def test_compare_py_writes_the_report_and_prints_the_table(sweep, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "compare.py", str(sweep), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model=lstm,seed=1 | lstm | char |" in result.stdout
    assert (out / "comparison.md").is_file() and (out / "bpb_by_model.png").is_file()


def test_compare_py_reports_a_bad_path_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "compare.py", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr

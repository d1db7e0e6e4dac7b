"""Several trackers at once: each gets the same settings, curves and final scores, read back through its own client."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.run.loggers import check_installed
from tests.commands import run_command
from tests.helpers import REPO, compose_config, sweep_overrides, tiny_overrides

FINAL = {
    "final/val_bpb": "val/bpb",
    "final/test_bpb": "test/bpb",
    "final/val_loss": "val/loss",
    "final/test_ppl": "test/ppl",
}


def metrics_json(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def curve(run: Path) -> list[tuple[int, float]]:
    with (run / "curve.csv").open() as f:
        return [(int(row["step"]), float(row["val/bpb"])) for row in csv.DictReader(f)]


def assert_same_curve(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], abs=1e-5)


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory, small_corpus) -> Path:
    """A 2-run sweep logging to TensorBoard, MLflow (SQLite store beside the sweep) and CSV at once, and
    to Aim (a repository beside the sweep) where aim is installed (it is not in the dev extra)."""
    pytest.importorskip("mlflow")
    sweep = tmp_path_factory.mktemp("tracked_sweep") / "compare_models"
    aim = ["aim"] if importlib.util.find_spec("aim") else []
    overrides = sweep_overrides(small_corpus, sweep, ["model=gpt,lstm"], ("trainer.max_steps=20",))
    command = [
        sys.executable,
        "train.py",
        "-m",
        *overrides,
        f"logger=[{','.join(['tensorboard', 'mlflow', 'csv', *aim])}]",
    ]
    stores = [f"logger.mlflow.tracking_uri=sqlite:///{sweep.parent / 'mlflow.db'}"]
    stores += [f"logger.aim.repo={sweep.parent / 'aim'}"] if aim else []
    result = run_command([*command, *stores], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data corruption may occur" not in result.stdout + result.stderr  # Aim's warning on reopening a closed run
    return sweep


@pytest.mark.slow
def test_a_sweeps_runs_land_in_one_mlflow_experiment_with_their_final_scores(tracked_sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked_sweep.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("compare_models")  # named after the sweep's folder
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["model=gpt", "model=lstm"]  # named as TensorBoard names them: what the sweep varies
    for name, run in runs.items():
        expected = metrics_json(tracked_sweep / name)
        assert run.info.status == "FINISHED"
        for tracked, key in FINAL.items():
            assert run.data.metrics[tracked] == pytest.approx(expected[key], abs=1e-6)
        assert run.data.params["model"] == name.split("=")[1] and float(run.data.params["lr"]) > 0
        assert int(run.data.params["params"]) == expected["params"]
        history = client.get_metric_history(run.info.run_id, "val/bpb")
        assert_same_curve([(m.step, m.value) for m in history], curve(tracked_sweep / name))
        assert "epoch" not in run.data.metrics and "test/bpb" not in run.data.metrics


@pytest.mark.slow
def test_the_csv_logger_records_the_same_curve_and_final_scores(tracked_sweep):
    for name in ("model=gpt", "model=lstm"):
        run = tracked_sweep / name
        with (run / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert "epoch" not in rows[0]
        logged = [(int(row["step"]), float(row["val/bpb"])) for row in rows if row["val/bpb"]]
        assert_same_curve(logged, curve(run))
        (final,) = [row for row in rows if row["final/test_bpb"]]
        expected = metrics_json(run)
        assert int(final["step"]) == expected["best_step"]
        assert {tracked: float(final[tracked]) for tracked in FINAL} == pytest.approx(
            {tracked: expected[key] for tracked, key in FINAL.items()}
        )
        assert "model: " in (run / "hparams.yaml").read_text()


def aim_runs(repo: Path) -> list:
    """The runs of an Aim repository, through Aim's own Repo. Aim's queries read an index that its
    server (`aim up`) brings up to date; here Aim's index manager does that first, as the server would."""
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager

    store = Repo(str(repo))
    for run_hash in store.list_all_runs():
        RepoIndexManager.get_index_manager(store).index(run_hash)
    return list(store.iter_runs())


@pytest.mark.slow
def test_a_sweeps_runs_land_in_one_aim_experiment_with_their_final_scores(tracked_sweep):
    pytest.importorskip("aim")
    runs = {run.name: run for run in aim_runs(tracked_sweep.parent / "aim")}
    assert sorted(runs) == ["model=gpt", "model=lstm"]  # named as TensorBoard names them
    for name, run in runs.items():
        expected = metrics_json(tracked_sweep / name)
        assert run.experiment == "compare_models" and not run.active  # the sweep's folder; closed
        assert run["hparams"]["model"] == name.split("=")[1] and run["hparams"]["params"] == expected["params"]
        tracked = {metric.name: metric.data.view("val").items_list() for metric in run.metrics()}  # (steps, [values])
        for final, key in FINAL.items():
            steps, (values,) = tracked[final]
            assert steps == [expected["best_step"]] and values == pytest.approx([expected[key]], abs=1e-6)
        steps, (values,) = tracked["val/bpb"]
        assert_same_curve(list(zip(steps, values)), curve(tracked_sweep / name))
        assert "epoch" not in tracked and "test/bpb" not in tracked


def wandb_records(path: Path):
    """The records of a W&B offline run file (`run-<id>.wandb`): W&B's protobuf Records in LevelDB's log
    format (a 7-byte `:W&B` header, then 32 kB blocks of checksum, length and type framed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, block = path.read_bytes(), 7, [], 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _items(updates) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


@pytest.mark.slow
def test_an_offline_wandb_run_holds_settings_curve_and_final_scores(tmp_path, small_corpus):
    pytest.importorskip("wandb")
    from lmlab.run.train import train

    run = tmp_path / "run"
    metrics = train(compose_config([*tiny_overrides("lstm", small_corpus), "logger=[wandb]"], run))
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    config, summary, history, names = {}, {}, [], []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names.append((record.run.project, record.run.display_name))
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "history":
            history.append(_items(record.history.item))
    assert names == [("lmlab", "run")]  # outside a sweep: project lmlab, the run folder's name
    assert config["model"] == "lstm" and config["params"] == metrics["params"]
    for tracked, key in FINAL.items():
        assert summary[tracked] == pytest.approx(metrics[key], abs=1e-6)
    logged = [(row["trainer/global_step"], row["val/bpb"]) for row in history if "val/bpb" in row]
    assert_same_curve(logged, curve(run))
    assert not any("epoch" in row for row in history)


def test_several_loggers_are_chosen_as_a_list(tmp_path, small_corpus):
    cfg = compose_config([*tiny_overrides("gpt", small_corpus), "logger=[tensorboard,mlflow,csv,wandb,aim]"], tmp_path)
    assert list(cfg.logger) == ["tensorboard", "mlflow", "csv", "wandb", "aim"]
    assert cfg.logger.mlflow.tracking_uri == "sqlite:///outputs/mlflow.db" and cfg.logger.wandb.offline is True
    assert cfg.logger.aim.repo == "outputs"


@pytest.mark.parametrize(
    ("logger", "module", "cls"),
    [("mlflow", "mlflow", "MLFlowLogger"), ("wandb", "wandb", "WandbLogger"), ("aim", "aim", "AimLogger")],
)
def test_a_tracker_whose_package_is_missing_names_its_extra_in_one_line(logger, module, cls, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    node = OmegaConf.create({"_target_": f"lmlab.run.loggers.{cls}"})
    with pytest.raises(ConfigError) as error:
        check_installed(logger, node)
    message = str(error.value)
    assert "\n" not in message and f"pip install -e '.[{module}]'" in message and f"logger={logger}" in message

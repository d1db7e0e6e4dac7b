"""TensorBoard leads with what varies: run names, HParams columns, final scores, curves by bytes and FLOPs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from lmlab.run.dashboards import hparams_columns, hparams_experiment
from lmlab.run.dirs import job_dir_name
from lmlab.run.labels import swept_keys, varying_overrides, varying_values

SWEEP_RUNS = [
    "model=gpt,tokenizer=bpe",
    "model=gpt,tokenizer=char",
    "model=lstm,tokenizer=bpe",
    "model=lstm,tokenizer=char",
]


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def read_curve(run: Path) -> list[dict[str, str]]:
    with (run / "curve.csv").open() as f:
        return list(csv.DictReader(f))


def test_validation_scalars_curve_and_samples_share_their_steps(trained_run):
    run = events(trained_run)
    scalar_steps = sorted({event.step for event in run.Scalars("val/bpb")})
    sample_steps = sorted({event.step for event in run.Tensors("val/sample/text_summary")})
    curve_steps = sorted({int(float(row["step"])) for row in read_curve(trained_run)})
    assert curve_steps == [10, 20]  # tiny_overrides: 20 steps, a validation every 10
    assert scalar_steps == curve_steps == sample_steps


def test_no_scalar_chart_of_a_run_is_a_single_point(trained_run):
    """Final scores live in HParams (the `final` sub-run) and metrics.json, not as lone points; no flat `epoch`."""
    tags = events(trained_run).Tags()["scalars"]
    assert "epoch" not in tags and not any(tag.startswith(("final/", "test/")) for tag in tags)
    for tag in tags:
        assert len({event.step for event in events(trained_run).Scalars(tag)}) >= 2, tag


def test_final_scores_sit_at_the_best_step_in_the_final_sub_run(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    final = events(trained_run / "final")
    assert set(final.Tags()["scalars"]) == {"val/bpb", "test/bpb"}
    for tag in ("val/bpb", "test/bpb"):
        (point,) = final.Scalars(tag)
        assert point.step == metrics["best_step"] and point.value == pytest.approx(metrics[tag], abs=1e-6)


def test_validation_is_also_logged_against_training_bytes_and_flops(trained_run):
    run = events(trained_run)
    curve = read_curve(trained_run)
    by_bytes = [(e.step, e.value) for e in run.Scalars("val_by_bytes/bpb")]
    by_flops = [(e.step, e.value) for e in run.Scalars("val_by_flops/bpb")]
    assert [step for step, _ in by_bytes] == [int(row["bytes_seen"]) // 1000 for row in curve]
    assert [step for step, _ in by_flops] == [int(float(row["train_flops"])) // 1_000_000 for row in curve]
    assert [v for _, v in by_bytes] == [v for _, v in by_flops] == pytest.approx([float(r["val/bpb"]) for r in curve])


def test_the_custom_scalars_layout_groups_bpb_by_step_bytes_and_flops(trained_run):
    run = events(trained_run)
    layout = layout_pb2.Layout()
    layout.ParseFromString(run.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    tags = {tag for category in layout.category for chart in category.chart for tag in chart.multiline.tag}
    assert tags == {r"^val/bpb$", r"^val_by_bytes/bpb$", r"^val_by_flops/bpb$", r"^val/ppl$", r"^train/tokens_per_s$"}
    assert {"val/bpb", "val_by_bytes/bpb", "val_by_flops/bpb", "val/ppl"} <= set(run.Tags()["scalars"])


def hparams_plugin_data(run: Path, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(events(run).PluginTagToContent("hparams")[tag])


def default_columns(experiment: api_pb2.Experiment) -> list[str]:
    """The hparams TensorBoard's HParams table shows before any is ticked: its backend sorts them by
    (not differs, name), its frontend puts differing ones first and shows the first five."""
    infos = sorted(experiment.hparam_infos, key=lambda info: (not info.differs, info.name))
    return [info.name for info in infos[:5]]


HPARAMS = {
    "model": "gpt",
    "tokenizer": "bpe",
    "lr": 3e-3,
    "params": 50_000,
    "batch_size": 8,
    "seed": 1,
    "stateful": False,
}


def declared(columns: list[str]) -> api_pb2.Experiment:
    summary = hparams_experiment(HPARAMS, columns)
    return metadata.parse_experiment_plugin_data(summary.value[0].metadata.plugin_data.content)


def test_the_declared_columns_are_the_leading_four_then_what_the_sweep_varies():
    assert default_columns(declared(hparams_columns(set()))) == ["lr", "model", "params", "tokenizer"]
    assert hparams_columns({"model", "tokenizer", "seed", "data.stateful"}) == [
        "model",
        "tokenizer",
        "lr",
        "params",
        "stateful",
        "seed",
    ]
    experiment = declared(["model", "tokenizer", "lr", "params", "seed", "stateful"])
    types = {info.name: info.type for info in experiment.hparam_infos}
    assert types == {
        "model": api_pb2.DATA_TYPE_STRING,
        "tokenizer": api_pb2.DATA_TYPE_STRING,
        "lr": api_pb2.DATA_TYPE_FLOAT64,
        "params": api_pb2.DATA_TYPE_FLOAT64,
        "seed": api_pb2.DATA_TYPE_FLOAT64,
        "stateful": api_pb2.DATA_TYPE_BOOL,
    }
    assert {info.name: info.display_name for info in experiment.hparam_infos}["lr"] == "learning rate"


@pytest.mark.slow
def test_sweep_runs_are_named_by_the_overrides_they_vary(tiny_sweep):
    """The sweep also fixed data.path, budgets and sizes on its command line: they stay out of the names."""
    assert sorted(path.name for path in tiny_sweep.iterdir() if (path / "metrics.json").is_file()) == SWEEP_RUNS


@pytest.mark.slow
def test_the_hparams_table_leads_with_model_tokenizer_lr_and_params(tiny_sweep):
    for run in SWEEP_RUNS:
        experiment = hparams_plugin_data(tiny_sweep / run, metadata.EXPERIMENT_TAG).experiment
        assert sorted(default_columns(experiment)) == ["lr", "model", "params", "tokenizer"]
        assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [
            ("final", "val/bpb"),
            ("final", "test/bpb"),
        ]
        start = hparams_plugin_data(tiny_sweep / run, metadata.SESSION_START_INFO_TAG).session_start_info
        assert start.group_name == " ".join(part.split("=")[1] for part in run.split(","))  # Trial ID: `gpt bpe`
        assert start.hparams["model"].string_value == run.split(",")[0].split("=")[1]
        assert {"model", "tokenizer", "lr", "params", "d_model", "batch_size", "max_steps"} <= set(start.hparams)


def hydra_node(tmp_path: Path, command_line: list[str], job: list[str], params: dict | None = None):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": command_line}}}))
    return OmegaConf.create(
        {
            "sweep": {"dir": str(tmp_path)},
            "sweeper": {"params": params},
            "overrides": {"task": job},
            "job": {"config": {"override_dirname": {"exclude_keys": ["trainer.devices"]}}},
        }
    )


def test_a_job_is_labelled_by_the_keys_its_sweep_varies(tmp_path):
    command_line = ["model=gpt,lstm", "data.path=/corpora/a.txt", "trainer.devices=1,2", "seed=range(1,3)"]
    job = ["model=lstm", "data.path=/corpora/a.txt", "trainer.devices=2", "seed=2"]
    hydra = hydra_node(tmp_path, command_line, job, params={"task.optimizer.lr": "1e-3,3e-3"})
    assert swept_keys(hydra) == {"model", "trainer.devices", "seed", "task.optimizer.lr"}
    assert varying_overrides(hydra) == "model=lstm,seed=2"  # sorted; trainer.devices is an excluded key
    assert varying_values(hydra) == "lstm 2"
    job_hydra = hydra_node(tmp_path, command_line, [*job, "task.optimizer.lr=3e-3"], {"task.optimizer.lr": "x"})
    name = job_dir_name("data.path=/corpora/a.txt,model=lstm,seed=2", 0, _root_=OmegaConf.create({"hydra": job_hydra}))
    assert name == "model=lstm,seed=2,task.optimizer.lr=3e-3"


def test_a_job_the_sweeper_added_is_told_apart_by_what_it_added(tmp_path):
    """sweep.extend_grid runs a pair again at the next rate: its folder and label must not be the pair's."""
    command_line = ["model=gpt,lstm", "lr_grid.point=r1,r2", "data.path=/corpora/a.txt"]
    original = ["model=lstm", "lr_grid.point=r2", "data.path=/corpora/a.txt"]
    extended = hydra_node(tmp_path, command_line, [*original, "task.optimizer.lr=0.09"])
    assert varying_overrides(hydra_node(tmp_path, command_line, original)) == "lr_grid.point=r2,model=lstm"
    assert varying_overrides(extended) == "lr_grid.point=r2,model=lstm,task.optimizer.lr=0.09"
    name = job_dir_name("unused", 0, _root_=OmegaConf.create({"hydra": extended}))
    assert name == "lr_grid.point=r2,model=lstm,task.optimizer.lr=0.09"


def test_without_a_record_of_the_sweep_every_override_names_the_job(tmp_path):
    hydra = OmegaConf.create({"sweep": {"dir": str(tmp_path / "none")}, "overrides": {"task": ["model=gpt"]}})
    assert varying_overrides(hydra) is None and varying_values(hydra) is None
    assert job_dir_name("model=gpt,seed=1", 0, _root_=OmegaConf.create({"hydra": hydra})) == "model=gpt,seed=1"

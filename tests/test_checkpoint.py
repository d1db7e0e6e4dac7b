"""Checkpoints are self-contained and safe to load; resume is exact; fine-tuning reuses model and tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lmlab.checkpoint import FORMAT_VERSION, SECTION, load_checkpoint, read_checkpoint
from lmlab.checkpoint.resume import checkpoint_run_dir
from lmlab.data.cache import tokenize_with_cache
from lmlab.data.corpus import split_by_bytes
from lmlab.data.sampling import EpochSampler, ResumableDataLoader
from lmlab.errors import ConfigError
from lmlab.run.train import train
from lmlab.tokenizers import CharTokenizer, load_tokenizer
from tests.helpers import SHAKESPEARE, compose_config, tiny_overrides


class StopAtStep(pl.Callback):
    """Ends training after `step` optimizer steps, as an interruption would (test-only)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_a_checkpoint_alone_rebuilds_the_model_and_tokenizer(trained_run, tmp_path):
    alone = tmp_path / "elsewhere.ckpt"  # no run directory, config or tokenizer.json beside it
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", alone)
    loaded = load_checkpoint(alone)
    assert loaded.step == 20 and not loaded.model.training
    assert loaded.model_config["_target_"] == "lmlab.models.GPT"
    assert loaded.model_config["vocab_size"] == loaded.model.vocab_size == loaded.tokenizer.vocab_size
    assert loaded.tokenizer.to_json() == load_tokenizer(trained_run / "tokenizer.json").to_json()
    assert loaded.data_config["block_size"] == 32 and loaded.config["names"]["model"] == "gpt"
    weights = torch.load(alone, weights_only=True)["state_dict"]
    assert all(torch.equal(weights[f"model.{key}"], value) for key, value in loaded.model.state_dict().items())


def test_every_checkpoint_is_plain_data_that_loads_with_weights_only(trained_run):
    paths = sorted((trained_run / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in paths} >= {"last.ckpt", "best-step20.ckpt"}
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)  # raises on any pickled object
        assert {"optimizer_states", "lr_schedulers", "loops", "callbacks", "state_dict"} <= checkpoint.keys()
        section = checkpoint[SECTION]
        assert section["format_version"] == FORMAT_VERSION and section["step"] == 20
        assert isinstance(section["tokenizer"], str) and isinstance(section["config"], dict)


def test_bad_checkpoints_are_one_line_config_errors(trained_run, tmp_path):
    good = trained_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[:5000])
    torch.save({key: value for key, value in checkpoint.items() if key != SECTION}, tmp_path / "foreign.ckpt")
    torch.save({**checkpoint, SECTION: {**checkpoint[SECTION], "format_version": 0}}, tmp_path / "old.ckpt")
    model = checkpoint[SECTION]["model"]
    torch.save(
        {**checkpoint, SECTION: {**checkpoint[SECTION], "model": {**model, "_target_": "os.system"}}},
        tmp_path / "code.ckpt",
    )
    for name, message in (
        ("missing.ckpt", "does not exist"),
        ("truncated.ckpt", "truncated"),
        ("foreign.ckpt", "has no 'lmlab' section"),
        ("old.ckpt", "format version 0"),
        ("code.ckpt", "is not an lmlab language model"),
    ):
        with pytest.raises(ConfigError) as raised:
            load_checkpoint(tmp_path / name)
        assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, small_corpus):
    """Interrupted mid-epoch (GPT with dropout) and at an epoch's end (13 batches per epoch), then
    resumed from last.ckpt: the same weights and val loss as a run never interrupted."""
    cases = {"mid_epoch": (["model.dropout=0.1"], 10), "epoch_end": (["model.dropout=0.1", "data.batch_size=128"], 13)}
    for name, (extra, stop) in cases.items():
        base = tiny_overrides("gpt", small_corpus) + ["trainer.val_check_interval=5", *extra]
        straight = train(compose_config(base, tmp_path / name / "straight"))
        interrupted = base + [f"+callbacks.stop._target_={__name__}.StopAtStep", f"+callbacks.stop.step={stop}"]
        assert train(compose_config(interrupted, tmp_path / name / "resumed"))["steps"] == stop
        last = tmp_path / name / "resumed" / "checkpoints" / "last.ckpt"
        resumed = train(compose_config([*base, f"ckpt_path={last}"], tmp_path / name / "resumed"))
        assert resumed["steps"] == 20 and resumed["val/loss"] == straight["val/loss"]
        a, b = (
            torch.load(tmp_path / name / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for run in ("straight", "resumed")
        )
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_last_ckpt_is_the_newest_state_even_when_the_last_validation_is_not_the_best(tmp_path, small_corpus):
    """Lightning 2.6's `save_last` writes last.ckpt only when a best checkpoint is saved at the same
    step. Ranked by the highest val/bpb, only the first validation of a falling loss is the best: the
    run's last.ckpt must still be its final step, and a resume from it must find nothing left to train."""
    base = tiny_overrides("gpt", small_corpus, steps=30) + ["callbacks.model_checkpoint.mode=max"]
    metrics = train(compose_config(base, tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert metrics["best_step"] == 15 and (checkpoints / "best-step15.ckpt").exists()
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 30
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step15.ckpt", "last.ckpt"]


def test_last_ckpt_can_be_written_every_n_steps_instead(tmp_path, small_corpus):
    """docs/reliability.md: `callbacks.last_checkpoint.every_n_train_steps` saves between validations."""
    base = tiny_overrides("gpt", small_corpus, steps=30) + ["++callbacks.last_checkpoint.every_n_train_steps=4"]
    stopped = base + [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=14"]
    assert train(compose_config(stopped, tmp_path / "run"))["steps"] == 14  # before the first validation
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


@pytest.mark.slow
def test_a_resumed_stateful_lstm_carries_its_state_across_the_restart(tmp_path, small_corpus):
    base = tiny_overrides("lstm", small_corpus) + ["data.stateful=true", "trainer.val_check_interval=5"]
    straight = train(compose_config(base, tmp_path / "straight"))
    train(
        compose_config(
            base + [f"+callbacks.stop._target_={__name__}.StopAtStep", "+callbacks.stop.step=7"], tmp_path / "resumed"
        )
    )
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([f"ckpt_path={last}"], tmp_path / "resumed"))  # the config comes from the checkpoint
    assert resumed["val/loss"] == straight["val/loss"] and resumed["model"] == "lstm"


def test_resuming_continues_in_the_run_directory_of_its_checkpoint(tmp_path):
    default = str(tmp_path / "outputs" / "runs" / "new")
    run = tmp_path / "outputs" / "runs" / "older"
    assert checkpoint_run_dir(None, default) == default
    assert checkpoint_run_dir(str(run / "checkpoints" / "best-step5.ckpt"), default) == str(run)
    assert checkpoint_run_dir(str(tmp_path / "copied.ckpt"), default) == default
    assert checkpoint_run_dir("last", default) == default  # no earlier run to resume
    for name in ("older", "newest"):
        (tmp_path / "outputs" / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "outputs" / "runs" / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert checkpoint_run_dir("last", default) == str(tmp_path / "outputs" / "runs" / "newest")


def test_fine_tuning_reuses_the_model_config_and_tokenizer_on_new_text(trained_run, tmp_path):
    text = SHAKESPEARE.read_text()[-40_000:]
    (tmp_path / "new.txt").write_text(text)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    base = [
        "data=text",
        f"data.path={tmp_path / 'new.txt'}",
        "data.batch_size=8",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.accelerator=cpu",
        "task.scheduler.warmup_steps=1",
        "sample.max_new_tokens=5",
        f"init_from={ckpt}",
    ]
    metrics = train(compose_config(base + ["model.dropout=0.2"], tmp_path / "tuned"))
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 4 * 8 * 32  # a fresh step count; 32: the model's windows
    tuned = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.ckpt")
    original = load_checkpoint(ckpt)
    assert tuned.tokenizer.to_json() == original.tokenizer.to_json()  # reused, not retrained on the new text
    assert {**tuned.model_config, "dropout": 0.0} == original.model_config and tuned.model_config["dropout"] == 0.2
    for args, message in (
        (["model.d_model=64"], "do not fit the model built here"),
        (["model=lstm"], "the checkpoint holds a gpt model"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(compose_config(base + args, tmp_path / "refused"))


def test_a_pretrained_tokenizer_gets_its_own_token_cache_entry(tmp_path):
    parts = split_by_bytes(SHAKESPEARE.read_text()[:20_000], [0.9, 0.05, 0.05])
    trained_elsewhere = CharTokenizer()
    trained_elsewhere.train("abc\n")  # same settings as a fresh CharTokenizer, other vocabulary
    fresh = tokenize_with_cache("corpus", parts, [0.9, 0.05, 0.05], CharTokenizer(), tmp_path)
    reused = tokenize_with_cache("corpus", parts, [0.9, 0.05, 0.05], trained_elsewhere, tmp_path)
    assert fresh.path != reused.path
    assert reused.tokenizer.to_json() == trained_elsewhere.to_json()  # encoded with it, not retrained
    assert reused.unk_tokens["train"] > 0 and fresh.unk_tokens["train"] == 0


def test_the_resumable_loader_restarts_mid_epoch_in_the_same_order():
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(list(range(20)), sampler=EpochSampler(20, shuffle=True, seed=5), batch_size=4)

    straight = loader()
    first = [batch.tolist() for batch in straight]
    state = None
    interrupted = loader()
    for index, _ in enumerate(interrupted):
        if index == 1:
            state = interrupted.state_dict()
            break
    assert state == {"epoch": 0, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == first[2:]
    straight.sampler.set_epoch(1)
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in straight] != first  # a new order each epoch


def test_reading_a_checkpoint_never_unpickles_code(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**checkpoint, "payload": Path("/")}, tmp_path / "object.ckpt")  # any class is refused
    with pytest.raises(ConfigError, match="weights_only=True"):
        read_checkpoint(tmp_path / "object.ckpt")

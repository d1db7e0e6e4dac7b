"""`trainer.precision=auto` (bf16 autocast on a CPU with native bf16, fp32 elsewhere, recorded as run) and `float32_matmul_precision`."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from lmlab.run import precision
from lmlab.run.precision import planned_precision, set_float32_matmul_precision
from lmlab.run.train import train
from tests.helpers import compose_config, tiny_overrides


@pytest.mark.parametrize(
    ("accelerator", "native_bf16", "expected"),
    [("cpu", True, "bf16-mixed"), ("cpu", False, "32-true"), ("gpu", True, "32-true")],
)
def test_auto_precision_follows_the_hardware(monkeypatch, accelerator, native_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    trainer = OmegaConf.create({"accelerator": accelerator, "precision": "auto"})
    assert planned_precision(trainer) == expected
    assert trainer.precision == "auto"  # the config is read, never written


def test_an_explicit_precision_is_left_alone(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    trainer = OmegaConf.create({"accelerator": "cpu", "precision": "32-true"})
    assert planned_precision(trainer) == "32-true"


def test_a_run_records_the_precision_it_trained_in(monkeypatch, tmp_path, small_corpus):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = compose_config(tiny_overrides("gpt", small_corpus, steps=4), tmp_path / "run")
    assert cfg.trainer.precision == "auto"  # the shipped default
    train(cfg)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").trainer.precision == "32-true"


def test_float32_matmul_precision_is_checked_before_training(tmp_path, small_corpus):
    cfg = compose_config(
        tiny_overrides("gpt", small_corpus, steps=4) + ["float32_matmul_precision=tf32"], tmp_path / "r"
    )
    with pytest.raises(ConfigError, match="float32_matmul_precision='tf32' is not one of highest, high, medium"):
        train(cfg)


@pytest.mark.parametrize(("value", "cudnn_tf32"), [("highest", False), ("high", True)])
def test_highest_also_turns_off_cudnn_tf32(monkeypatch, value, cudnn_tf32):
    """cuDNN's LSTM ignores torch's matmul setting: a recipe asking for full fp32 must switch both."""
    chosen = []
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision.torch, "set_float32_matmul_precision", chosen.append)
    monkeypatch.setattr(precision.torch.backends.cudnn, "allow_tf32", not cudnn_tf32)
    set_float32_matmul_precision(value)
    assert chosen == [value]
    assert precision.torch.backends.cudnn.allow_tf32 is cudnn_tf32

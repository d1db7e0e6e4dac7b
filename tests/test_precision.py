"""`trainer.precision=auto`: bf16 autocast on a CPU with native bf16, fp32 elsewhere, recorded as run."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmlab.run import precision
from lmlab.run.precision import resolve_precision
from lmlab.run.train import train
from tests.helpers import compose_config, tiny_overrides


@pytest.mark.parametrize(
    ("accelerator", "native_bf16", "expected"),
    [("cpu", True, "bf16-mixed"), ("cpu", False, "32-true"), ("gpu", True, "32-true")],
)
def test_auto_precision_follows_the_hardware(monkeypatch, accelerator, native_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    trainer = OmegaConf.create({"accelerator": accelerator, "precision": "auto"})
    resolve_precision(trainer)
    assert trainer.precision == expected


def test_an_explicit_precision_is_left_alone(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    trainer = OmegaConf.create({"accelerator": "cpu", "precision": "32-true"})
    resolve_precision(trainer)
    assert trainer.precision == "32-true"


def test_a_run_records_the_precision_it_trained_in(monkeypatch, tmp_path, small_corpus):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = compose_config(tiny_overrides("gpt", small_corpus, steps=4), tmp_path / "run")
    assert cfg.trainer.precision == "auto"  # the shipped default
    train(cfg)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").trainer.precision == "32-true"

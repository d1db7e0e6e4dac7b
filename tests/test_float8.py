"""`perf.float8=true`: torchao's FP8 linear layers, checked on the CPU (which emulates the FP8 products)."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
from torch import nn

from lmlab.checkpoint.format import load_checkpoint
from lmlab.errors import ConfigError
from lmlab.models import GPT, Llama
from lmlab.perf import Perf, apply_perf
from lmlab.perf import float8 as float8_module
from lmlab.perf.float8 import check_float8_device, use_float8_matmuls
from lmlab.run.train import train
from lmlab.task import LanguageModelTask
from tests.helpers import compose_config, tiny_overrides, train_losses

pytest.importorskip("torchao.float8", reason="the fp8 extra (torchao) is part of `make test`'s environment")
from torchao.float8.float8_linear import Float8Linear


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=64, d_model=32, n_layer=2, n_head=2, block_size=16)


def test_every_linear_layer_fp8_kernels_take_is_swapped_and_the_weights_stay_the_same_objects():
    model = tiny_gpt()
    params = {name: id(p) for name, p in model.named_parameters()}
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert use_float8_matmuls(model) == len(linears) > 0
    assert all(isinstance(model.get_submodule(name), Float8Linear) for name in linears)
    assert {name: id(p) for name, p in model.named_parameters()} == params  # tying and decay groups hold
    assert model.lm_head.weight is model.wte.weight
    assert set(tiny_gpt().state_dict()) == set(model.state_dict())  # a checkpoint loads into a plain model


def test_sizes_fp8_kernels_cannot_take_stay_in_the_run_precision():
    torch.manual_seed(0)
    model = Llama(vocab_size=60, d_model=24, n_layer=1, n_head=2, block_size=16)  # 24 and 60: not multiples of 16
    swapped = use_float8_matmuls(model)
    kept = [m for m in model.modules() if type(m) is nn.Linear]
    assert kept and all(m.in_features % 16 or m.out_features % 16 for m in kept)
    assert swapped == sum(isinstance(m, Float8Linear) for m in model.modules())


def _losses(float8: bool, steps: int = 25) -> list[float]:
    model = tiny_gpt()
    apply_perf(model, Perf(float8=float8))
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    assert any(isinstance(m, Float8Linear) for m in model.modules()) is float8
    text = torch.arange(17).repeat(8, 1) * 3 % 64  # 8 copies of one learnable sequence
    return train_losses(task, [(text[:, :-1], text[:, 1:])] * steps, autocast_dtype=torch.bfloat16)


def test_fp8_training_learns_and_follows_the_bf16_curve():
    fp8, bf16 = _losses(True), _losses(False)
    assert fp8[-1] < 0.5 * fp8[0]  # it learns
    assert fp8[0] == pytest.approx(bf16[0], rel=0.02)  # the same model, FP8 rounding apart
    assert max(abs(a - b) for a, b in zip(fp8, bf16)) < 0.15  # step by step, within FP8's noise


def test_without_torchao_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails
    with pytest.raises(ConfigError, match=r"perf.float8=true needs torchao \(pip install torchao"):
        apply_perf(tiny_gpt(), Perf(float8=True))


def test_a_gpu_without_fp8_tensor_cores_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(float8_module.torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(float8_module.torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    with pytest.raises(ConfigError, match="NVIDIA A100 has 8.0: set perf.float8=false"):
        check_float8_device(torch.device("cuda", 0))
    monkeypatch.setattr(float8_module.torch.cuda, "get_device_capability", lambda device: (9, 0))
    check_float8_device(torch.device("cuda", 0))  # Hopper


def test_swapping_twice_changes_nothing():
    model = tiny_gpt()
    assert use_float8_matmuls(model) > 0
    kinds = [type(m) for m in model.modules()]
    assert use_float8_matmuls(model) == 0
    assert [type(m) for m in model.modules()] == kinds


def test_a_float8_run_trains_evaluates_and_its_checkpoint_loads_into_a_plain_model(tmp_path, small_corpus):
    """The whole Lightning path: training, validation and test (under no_grad, not inference_mode,
    which torchao's layers do not support), then the checkpoint as generate.py reads it."""
    overrides = tiny_overrides("gpt", small_corpus, steps=8) + ["perf.float8=true", "trainer.precision=bf16-mixed"]
    cfg = compose_config(overrides, tmp_path / "run")
    with pytest.warns(UserWarning, match="the FP8 products are emulated"):
        metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["test/bpb"] < metrics["val/bpb"] + 1  # scored, finite
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not any(isinstance(m, Float8Linear) for m in loaded.model.modules())

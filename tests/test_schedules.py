"""Learning-rate schedules: per step (warmup + cosine/linear/constant), per epoch (step decay) and per
validation (plateau), alone and inside tiny runs, including a resumed one."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lmlab.errors import ConfigError
from lmlab.optim import (
    ValidationPlateau,
    plateau,
    schedule_arguments,
    step_decay,
    warmup_constant,
    warmup_cosine,
    warmup_linear,
    warmup_stable_decay,
)
from lmlab.run.train import train
from tests.helpers import SHAKESPEARE, compose_config


class RecordLR(pl.Callback):
    """Appends `global_step epoch lr` before every training batch to `path` (test-only)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        with open(self.path, "a") as out:
            out.write(
                f"{trainer.global_step} {trainer.current_epoch} {trainer.optimizers[0].param_groups[0]['lr']!r}\n"
            )


def recorded(run: Path) -> list[tuple[int, int, float]]:
    return [
        (int(s), int(e), float(lr))
        for s, e, lr in (line.split() for line in (run / "lrs.txt").read_text().splitlines())
    ]


def sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def epoch_rates(scheduler, optimizer, epochs: int) -> list[float]:
    """The rate each of `epochs` scheduler periods (epochs or steps) trains at."""
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return rates


def test_step_decay_keeps_the_peak_for_k_epochs_then_multiplies_each_epoch():
    optimizer = sgd()
    rates = epoch_rates(step_decay(optimizer, factor=1 / 1.2, start_epoch=7), optimizer, 39)
    assert rates[:7] == [1.0] * 7  # Zaremba's code: epochs 1-7 at lr 1 (it decays once `epoch > 6`)
    assert rates[7:] == pytest.approx([1.2**-k for k in range(1, 33)], rel=1e-12)  # epoch 39: 1 / 1.2^32
    optimizer = sgd(2.0)
    assert epoch_rates(step_decay(optimizer, factor=0.5, start_epoch=0), optimizer, 3) == [1.0, 0.5, 0.25]


def test_step_decay_resumes_exactly_from_its_state_dict():
    optimizer = sgd()
    scheduler = step_decay(optimizer, factor=0.8, start_epoch=2)
    straight = epoch_rates(scheduler, optimizer, 10)
    optimizer = sgd()
    first = step_decay(optimizer, factor=0.8, start_epoch=2)
    head = epoch_rates(first, optimizer, 4)
    state, optimizer_state = first.state_dict(), optimizer.state_dict()
    optimizer = sgd()
    resumed = step_decay(optimizer, factor=0.8, start_epoch=2)
    optimizer.load_state_dict(optimizer_state)  # Lightning's order: build both, then restore both
    resumed.load_state_dict(state)
    assert head + epoch_rates(resumed, optimizer, 6) == straight


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": 0.0}, "task.scheduler.factor=0.0 must be > 0"),
        ({"factor": -0.5}, "task.scheduler.factor=-0.5 must be > 0"),
        ({"factor": 1.2}, "to divide by 1.2 set task.scheduler.factor=0.833333"),
        ({"start_epoch": -1}, "task.scheduler.start_epoch=-1 must be >= 0"),
    ],
)
def test_step_decay_refuses_bad_settings_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as raised:
        step_decay(sgd(), **kwargs)
    assert "\n" not in str(raised.value)


def test_the_step_schedules_are_unchanged():
    """Warmup then cosine/linear/constant, built as factory(optimizer, total_steps=...)."""
    expected = {
        warmup_cosine: {0: 0.1, 9: 1.0, 60: 0.1 + 0.9 * 0.5, 110: 0.1, 200: 0.1},
        warmup_linear: {0: 0.1, 9: 1.0, 60: 0.5, 110: 0.0},
        warmup_constant: {0: 0.1, 5: 0.6, 9: 1.0, 200: 1.0},
    }
    for factory, at in expected.items():
        assert schedule_arguments(factory, 110) == {"total_steps": 110}
        optimizer = sgd()
        scheduler = factory(optimizer, **schedule_arguments(factory, 110), warmup_steps=10)
        rates = epoch_rates(scheduler, optimizer, 201)  # the rate each of steps 0..200 trains at
        assert {step: rates[step] for step in at} == pytest.approx(at), factory.__name__
    assert schedule_arguments(step_decay, 110) == {} and schedule_arguments(plateau, 110) == {}


# 10 steps, 2 of warmup, the last 40% (4 steps: 6..9) decaying; each row: the rate steps 0..9 train at
WSD_TABLE = {
    "linear": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25],
    "cosine": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627],
    "1-sqrt": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.2928932188134524, 0.1339745962155614],
}


@pytest.mark.parametrize("shape", WSD_TABLE)
def test_warmup_stable_decay_follows_the_hand_written_table(shape):
    optimizer = sgd()
    scheduler = warmup_stable_decay(
        optimizer, **schedule_arguments(warmup_stable_decay, 10), warmup_steps=2, decay_fraction=0.4, decay_shape=shape
    )
    assert epoch_rates(scheduler, optimizer, 10) == pytest.approx(WSD_TABLE[shape], abs=1e-12)


def test_warmup_stable_decay_ends_at_its_floor_and_decays_the_whole_run_at_fraction_1():
    optimizer = sgd(2.0)
    scheduler = warmup_stable_decay(optimizer, 4, warmup_steps=0, decay_fraction=1.0, min_lr_ratio=0.5)
    assert epoch_rates(scheduler, optimizer, 6) == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay_fraction": 0.0}, r"task.scheduler.decay_fraction=0.0 must be in \(0, 1\]"),
        ({"decay_fraction": 1.5}, r"task.scheduler.decay_fraction=1.5 must be in \(0, 1\]"),
        ({"decay_shape": "exp"}, "task.scheduler.decay_shape='exp' is not one of linear, cosine, 1-sqrt"),
    ],
)
def test_warmup_stable_decay_refuses_bad_settings_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as raised:
        warmup_stable_decay(sgd(), 100, **kwargs)
    assert "\n" not in str(raised.value)


def test_plateau_takes_each_validation_once_and_divides_when_it_does_not_improve():
    optimizer = sgd(20.0)
    scheduler = plateau(optimizer, factor=0.25)
    assert isinstance(scheduler, ValidationPlateau)
    for value in (5.0, 5.0, 5.0):  # offered after every step, but no validation has ended: ignored
        scheduler.step(value)
    assert optimizer.param_groups[0]["lr"] == 20.0
    rates = []
    for value in (5.0, 4.0, 4.5, 3.0, 3.0):  # the word_language_model rule: /4 after any non-improvement
        scheduler.validation_ended()
        for _ in range(3):  # the same value stays on offer at the following steps
            scheduler.step(value)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [20.0, 20.0, 5.0, 5.0, 1.25]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"factor": 1.0}, r"factor=1.0 must be in \(0, 1\)"), ({"patience": -1}, "patience=-1 must be >= 0")],
)
def test_plateau_refuses_bad_settings_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plateau(sgd(), **kwargs)


def tiny_run(tmp_path: Path, *extra: str) -> list[str]:
    """A 1-layer LSTM on 3 kB of characters, 10 steps per epoch, recording its LR before every step."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:3000])
    return [
        "model=lstm",
        "model.d_model=16",
        "model.n_layer=1",
        "data=text",
        f"data.path={corpus}",
        "data.block_size=16",
        "data.batch_size=16",
        "optimizer=sgd",
        "task.optimizer.lr=1.0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "sample.max_new_tokens=5",
        f"+callbacks.lrs._target_={__name__}.RecordLR",
        f"+callbacks.lrs.path={tmp_path / 'run' / 'lrs.txt'}",
        *extra,
    ]


STEP_DECAY = ("scheduler=step_decay", "task.scheduler.factor=0.5", "task.scheduler.start_epoch=1")


@pytest.mark.slow
def test_step_decay_in_a_step_bounded_run_follows_the_epochs(tmp_path):
    """35 steps of 10-step epochs: the rate halves at each epoch boundary after the first, also mid-run."""
    cfg = compose_config(
        tiny_run(tmp_path, *STEP_DECAY, "trainer.max_steps=35", "trainer.val_check_interval=10"), tmp_path / "run"
    )
    assert train(cfg)["steps"] == 35
    rows = recorded(tmp_path / "run")
    assert [step for step, _, _ in rows] == list(range(35))
    assert {epoch for _, epoch, _ in rows} == {0, 1, 2, 3}  # 10 steps per epoch (2700 chars / 16 / 16)
    assert all(lr == 0.5 ** max(0, epoch) for _, epoch, lr in rows)


@pytest.mark.slow
def test_step_decay_resumed_mid_epoch_continues_exactly(tmp_path):
    base = tiny_run(tmp_path, *STEP_DECAY, "trainer.max_steps=35", "trainer.val_check_interval=5")
    straight = train(compose_config(base, tmp_path / "run"))
    straight_rows = recorded(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "straight")
    stop = ["+callbacks.stop._target_=tests.test_checkpoint.StopAtStep", "+callbacks.stop.step=15"]
    train(compose_config(base + stop, tmp_path / "run"))  # stops mid-epoch 1, at a validation
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([*base, f"ckpt_path={last}"], tmp_path / "run"))
    assert recorded(tmp_path / "run") == straight_rows
    assert resumed["val/loss"] == straight["val/loss"]


def test_plateau_with_validation_every_3_steps_across_epochs(tmp_path):
    """threshold 0.999: no validation after the first counts as better, so each one divides by 4 once,
    however many steps pass before the next (validation at steps 3, 6, 9, 12; epochs of 10 steps)."""
    extra = (
        "scheduler=plateau",
        "task.scheduler.threshold=0.999",
        "trainer.max_steps=14",
        "trainer.val_check_interval=3",
    )
    train(compose_config(tiny_run(tmp_path, *extra), tmp_path / "run"))
    rates = [lr for _, _, lr in recorded(tmp_path / "run")]
    assert rates == [1.0] * 6 + [0.25] * 3 + [0.0625] * 3 + [0.015625] * 2


@pytest.mark.slow
def test_plateau_per_epoch_validation(tmp_path):
    extra = (
        "scheduler=plateau",
        "task.scheduler.threshold=0.999",
        "trainer.max_steps=-1",
        "trainer.max_epochs=3",
        "trainer.val_check_interval=1.0",
        "trainer.check_val_every_n_epoch=1",
    )
    train(compose_config(tiny_run(tmp_path, *extra), tmp_path / "run"))
    assert {epoch: lr for _, epoch, lr in recorded(tmp_path / "run")} == {0: 1.0, 1: 1.0, 2: 0.25}


@pytest.mark.parametrize(
    "extra", [("trainer.limit_val_batches=0",), ("trainer.val_check_interval=50",)], ids=["no_val", "val_after_end"]
)
def test_plateau_without_validation_is_refused_in_one_line(tmp_path, extra):
    cfg = compose_config(tiny_run(tmp_path, "scheduler=plateau", "trainer.max_steps=20", *extra), tmp_path / "run")
    with pytest.raises(ConfigError, match="scheduler=plateau .* never validates") as raised:
        train(cfg)
    assert "\n" not in str(raised.value)

"""The speed switches change how fast a run goes, never what it computes; the terminal stays quiet and compact."""

from __future__ import annotations

import io
import logging
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import HydraException
from rich.console import Console

from lmlab.callbacks import SyncFreeProgressBar, TokenThroughput
from lmlab.errors import ConfigError
from lmlab.models import GPT
from lmlab.perf import SHORT_CPU_CONTEXT, Perf, auto_attention, dynamo_settings
from lmlab.run.build import build
from lmlab.run.quiet import quiet_lightning
from lmlab.task import LanguageModelTask
from tests.helpers import compose_config, train_losses


def _losses(compile: bool, loss_chunk_rows: int = 0) -> list[float]:
    torch.manual_seed(0)
    model = GPT(vocab_size=37, d_model=32, n_layer=2, n_head=2, block_size=16)
    task = LanguageModelTask(
        model,
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        loss_chunk_rows=loss_chunk_rows,
        perf=Perf(compile=compile),
    )
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 37, (4, 17), generator=g) for _ in range(3)]
    return train_losses(task, [(seq[:, :-1], seq[:, 1:]) for seq in seqs])


@pytest.mark.slow
def test_compiled_training_matches_eager():
    assert _losses(compile=True) == pytest.approx(_losses(compile=False), rel=1e-4)


@pytest.mark.slow
def test_chunked_loss_trains_like_the_plain_one_compiled_or_not():
    plain = _losses(compile=False)
    assert _losses(compile=False, loss_chunk_rows=24) == pytest.approx(plain, rel=1e-6)  # 64 rows: 24, 24, 16
    assert _losses(compile=True, loss_chunk_rows=24) == pytest.approx(plain, rel=1e-4)


def test_vocab_padding_leaves_the_probabilities_unchanged():
    torch.manual_seed(0)
    plain = GPT(vocab_size=37, d_model=32, n_layer=2, n_head=2, block_size=16)
    padded = GPT(vocab_size=37, d_model=32, n_layer=2, n_head=2, block_size=16, pad_vocab_to=64)
    with torch.no_grad():
        for name, param in padded.named_parameters():
            source = dict(plain.named_parameters())[name]
            param.zero_()
            param[tuple(slice(0, n) for n in source.shape)] = source  # padding rows start at zero
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = padded(idx)
    assert logits.shape[-1] == 37
    assert torch.allclose(logits.softmax(-1), plain(idx)[0].softmax(-1), atol=1e-6)


def test_the_progress_bar_fits_80_columns_with_loss_val_bpb_and_tokens_per_s(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(s[:, :-1], s[:, 1:]) for s in (torch.randint(0, 37, (4, 17), generator=g) for _ in range(20))]
    model = GPT(vocab_size=37, d_model=16, n_layer=1, n_head=2, block_size=16)
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    bar = SyncFreeProgressBar(metrics_every_n_steps=10, console_kwargs={"file": io.StringIO(), "width": 80})
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=20,
        max_epochs=-1,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[bar, TokenThroughput(every_n_steps=10)],
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    trainer.callback_metrics["val/bpb"] = torch.tensor(2.3456)  # as a validation leaves it
    bar.on_validation_end(trainer, task)
    assert set(bar.get_metrics(trainer, task)) == {"loss", "val bpb", "tok/s"}
    out = io.StringIO()
    Console(file=out, width=80).print(bar.progress.get_renderable())
    (line,) = out.getvalue().splitlines()  # one line: the metrics do not wrap into a column
    assert line.startswith("Epoch 0 ") and "20/20" in line and "val bpb: 2.346" in line and "tok/s:" in line


def test_quiet_hides_lightning_chatter_but_not_real_warnings(caplog):
    quiet_lightning(verbose=False)
    info = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    compile_note = logging.getLogger("torch._higher_order_ops.wrap")
    with caplog.at_level(logging.NOTSET), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning(verbose=False)  # catch_warnings restores the filters on exit
        info.info("GPU available: False, used: False")
        compile_note.warning("Detected that context_fn is passed to torch.utils.checkpoint under torch.compile.")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("the learning rate is too high", UserWarning, stacklevel=1)
    assert "GPU available" not in caplog.text and "context_fn" not in caplog.text
    assert [str(w.message) for w in caught] == ["the learning rate is too high"]
    quiet_lightning(verbose=True)
    assert info.isEnabledFor(logging.INFO) and compile_note.isEnabledFor(logging.WARNING)


class _StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _fit_losses(tmp_path, callbacks: list, progress_bar: bool) -> torch.Tensor:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(s[:, :-1], s[:, 1:]) for s in (torch.randint(0, 37, (4, 17), generator=g) for _ in range(12))]
    task = LanguageModelTask(
        GPT(vocab_size=37, d_model=16, n_layer=1, n_head=2, block_size=16, dropout=0.1),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
    )
    seen = _StepLosses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        log_every_n_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, seen],
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return torch.stack(seen.losses)


def test_the_host_side_switches_leave_the_loss_curve_bit_identical(tmp_path):
    """The cheap progress bar, tokens/s and the sparse NaN check only read: dropout masks and all."""
    from lmlab.callbacks import NonFiniteLossGuard

    bare = _fit_losses(tmp_path, [], progress_bar=False)
    console = {"file": io.StringIO(), "width": 80}
    shipped = [SyncFreeProgressBar(console_kwargs=console), TokenThroughput(every_n_steps=5), NonFiniteLossGuard(5)]
    assert torch.equal(_fit_losses(tmp_path, shipped, progress_bar=True), bare)


def test_pinning_the_attention_kernel_keeps_the_loss():
    torch.manual_seed(0)
    model = GPT(vocab_size=37, d_model=32, n_layer=1, n_head=2, block_size=16)
    seq = torch.randint(0, 37, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name in ("auto", "flash", "math"):
        task = LanguageModelTask(model, optimizer=torch.optim.SGD, perf=Perf(attention=name))
        losses[name] = task._step_loss(seq[:, :-1], seq[:, 1:], training=True)[0].item()
    assert losses["math"] == pytest.approx(losses["flash"], rel=1e-5) == pytest.approx(losses["auto"], rel=1e-5)
    with LanguageModelTask(model, optimizer=torch.optim.SGD, perf=Perf(attention="math"))._attention(seq):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with pytest.raises(ValueError, match="perf.attention must be one of"):
        Perf(attention="fast")


@pytest.mark.parametrize(("length", "math_only"), [(64, True), (SHORT_CPU_CONTEXT, True), (256, False)])
def test_auto_attention_takes_the_math_kernel_for_short_contexts_on_a_cpu(length, math_only):
    """On a CPU the flash kernel's backward is slow for short sequences (docs/benchmarks.md)."""
    with auto_attention(torch.zeros(2, length, dtype=torch.long)):
        assert torch.backends.cuda.flash_sdp_enabled() is not math_only
        assert torch.backends.cuda.math_sdp_enabled()


@pytest.mark.parametrize(("choice", "split"), [("split", True), ("whole", False)])
def test_compile_ddp_sets_how_dynamo_compiles_a_distributed_fit(choice, split):
    """Dynamo's DDPOptimizer (split) cuts the compiled graph at gradient buckets; whole keeps one graph.
    Set for the fit only, then put back: no process-wide write outlives the run."""
    before = torch._dynamo.config.optimize_ddp
    perf = Perf(compile=True, compile_ddp=choice)
    with dynamo_settings(perf, world_size=1):
        assert torch._dynamo.config.optimize_ddp == before  # one process: nothing to decide
    with dynamo_settings(perf, world_size=2):
        assert torch._dynamo.config.optimize_ddp is split
    assert torch._dynamo.config.optimize_ddp == before
    with dynamo_settings(Perf(compile=False, compile_ddp=choice), world_size=2):
        assert torch._dynamo.config.optimize_ddp == before  # not compiled: Dynamo is not involved


def test_compile_ddp_names_its_choices():
    with pytest.raises(ValueError, match="perf.compile_ddp must be split or whole"):
        Perf(compile=True, compile_ddp="overlap")


@pytest.mark.parametrize(
    "old", ["compile", "compile_mode", "compile_ddp", "float8", "attention", "cuda_graphs", "activation_checkpointing"]
)
def test_the_speed_switches_moved_from_task_to_perf(tmp_path, old):
    """task.KEY is refused when the config is composed, naming the key; perf.KEY is the switch now."""
    with pytest.raises(HydraException, match=f"Could not override 'task.{old}'"):
        compose_config([f"task.{old}=null"], tmp_path)
    assert old in compose_config([], tmp_path).perf


def test_a_bad_perf_value_is_one_line_naming_its_key(tmp_path):
    cfg = compose_config(["perf.cuda_graphs=sometimes"], tmp_path)
    with pytest.raises(ConfigError, match="invalid perf config: perf.cuda_graphs must be auto, true or false"):
        build(cfg.perf, "perf")
    assert build(compose_config(["perf.attention=math"], tmp_path).perf, "perf") == Perf(attention="math")


class LoggedMetrics(pl.Callback):
    """Every value logged on a training step, by name, as the loggers receive them."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        for name, value in trainer.callback_metrics.items():
            self.seen.setdefault(name, []).append(float(value))


@pytest.mark.parametrize("peak_tflops", [None, 1e-6])
def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak(tmp_path, peak_tflops):
    """On a CPU there is no MFU unless the peak is given; given, train/mfu is tokens/s x training FLOPs
    per token / peak, logged beside train/tokens_per_s."""
    g = torch.Generator().manual_seed(0)
    data = [(s[:, :-1], s[:, 1:]) for s in (torch.randint(0, 37, (4, 17), generator=g) for _ in range(20))]
    model = GPT(vocab_size=37, d_model=16, n_layer=1, n_head=2, block_size=16)
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    logged = LoggedMetrics()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=20,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[TokenThroughput(every_n_steps=10, peak_tflops=peak_tflops), logged],
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert len(logged.seen["train/tokens_per_s"]) > 0
    if peak_tflops is None:
        assert "train/mfu" not in logged.seen
        return
    tokens_per_s, mfu = trainer.callback_metrics["train/tokens_per_s"], trainer.callback_metrics["train/mfu"]
    expected = float(tokens_per_s) * model.flops_per_token(16) / (peak_tflops * 1e12)
    assert float(mfu) == pytest.approx(expected, rel=1e-5) and float(mfu) > 0


def test_a_peak_that_is_not_positive_is_refused_naming_the_key(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"^callbacks.throughput.peak_tflops must be > 0 \(got 0\)"):
        TokenThroughput(peak_tflops=0).on_fit_start(trainer, None)

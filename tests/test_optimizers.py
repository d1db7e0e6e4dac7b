"""The optimizers beyond AdamW: each update against a reference written out here, the parameter groups
they get, one-line refusals, and runs that resume exactly."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models import GPT, Jamba, Llama, LSTMAttentionLM, Mamba, RecurrentLM, TransformerLM
from lmlab.optim import MuonWithAdamW, build_optimizer, hidden_matrix_groups, parameter_groups
from lmlab.optim.eight_bit import adamw_8bit
from lmlab.optim.lion import Lion
from lmlab.optim.schedule_free import EvalWeights, adamw_schedule_free
from lmlab.run.train import train
from tests.helpers import compose_config, tiny_overrides

NS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz coefficients


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Orthogonalise g by the quintic iteration X <- aX + (bA + cA^2)X, A = XX^T, on the wide side, in float64."""
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    a, b, c = NS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def losses_and_grads(model: nn.Module, steps: int, step_fn) -> None:
    """`steps` optimizer steps on a fixed batch of a tiny GPT's loss; step_fn(params) updates."""
    torch.manual_seed(0)
    idx = torch.randint(0, model.vocab_size, (4, 8))
    for _ in range(steps):
        model.zero_grad()
        logits, _ = model(idx[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).backward()
        step_fn()


def tiny_gpt(**kwargs) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=11, d_model=16, n_layer=1, n_head=2, block_size=8, **kwargs)


def test_muon_updates_hidden_matrices_by_orthogonalised_nesterov_momentum_and_the_rest_by_adamw():
    """Each step of the hidden matrices against Newton-Schulz of the Nesterov momentum, and the AdamW
    parameters to float32 precision over all steps.

    torch iterates in bf16 and this reference in float64; the quintic multiplies small singular
    directions by up to 3.4 per iteration, bf16's rounding with them, so the two steps differ by up to
    10% (as norms; 15% allowed). A step without the orthogonalisation, the Nesterov term or the
    shape scaling is off by 40% or more."""
    model = tiny_gpt(bias=True)
    reference = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    groups = hidden_matrix_groups(model, weight_decay=0.1)
    hidden = {id(p) for p in groups[0]["params"]}
    decayed = {id(p) for g in groups[:2] for p in g["params"]}
    lr, adamw_lr, mu, (beta1, beta2), eps, wd = 0.05, 0.01, 0.95, (0.9, 0.99), 1e-8, 0.1
    optimizer = MuonWithAdamW(
        groups, lr=lr, momentum=mu, adamw_lr=adamw_lr, betas=(beta1, beta2), eps=eps, weight_decay=wd
    )
    state = {name: {"buf": 0.0, "m": 0.0, "v": 0.0} for name in reference}
    muon_steps = []  # (name, expected step, actual step)
    step = 0

    def both() -> None:
        nonlocal step
        step += 1
        expected = {}
        for name, p in model.named_parameters():
            g, w, s = p.grad.double(), reference[name], state[name]
            if id(p) in hidden:  # torch's Muon: buf = mu buf + (1 - mu) g; Nesterov: (1 - mu) g + mu buf
                s["buf"] = mu * s["buf"] + (1 - mu) * g
                update = newton_schulz((1 - mu) * g + mu * s["buf"])
                old = p.detach().double()
                scale = math.sqrt(max(1, w.size(0) / w.size(1)))
                expected[name] = (old * (1 - lr * wd) - lr * scale * update - old, old)
            else:  # AdamW with bias correction; decoupled decay on the decayed group only
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                m_hat, v_hat = s["m"] / (1 - beta1**step), s["v"] / (1 - beta2**step)
                w.mul_(1 - adamw_lr * (wd if id(p) in decayed else 0.0))
                w.add_(-adamw_lr * m_hat / (v_hat.sqrt() + eps))
        optimizer.step()
        for name, p in model.named_parameters():
            if name in expected:
                want, old = expected[name]
                muon_steps.append((name, want, p.detach().double() - old))

    losses_and_grads(model, 3, both)
    assert len(muon_steps) == 3 * 4  # qkv, attention proj, fc, mlp proj
    for name, want, got in muon_steps:
        assert (got - want).norm() <= 0.15 * want.norm(), name
    for name, p in model.named_parameters():
        if id(p) not in hidden:
            assert torch.allclose(p.double(), reference[name], atol=1e-6, rtol=0), name


def test_muon_takes_hidden_matrices_and_leaves_embeddings_output_norms_and_biases_to_adamw():
    untied = GPT(vocab_size=11, d_model=16, n_layer=1, n_head=2, block_size=8, bias=True)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())  # as an untied model has it
    names = {id(p): n for n, p in untied.named_parameters()}
    muon, other, no_decay = ([names[id(p)] for p in g["params"]] for g in hidden_matrix_groups(untied, 0.1))
    assert muon == [
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
    ]
    assert other == ["lm_head.weight"]  # the output layer: decayed, but by AdamW
    assert {"wpe.weight", "ln_f.weight", "blocks.0.attn.qkv.bias", "blocks.0.ln1.weight"} <= set(no_decay)
    assert "wte.weight" in no_decay and not set(muon) & set(no_decay)

    lstm = RecurrentLM(vocab_size=11, d_model=8, n_layer=1, cell="lstm", tie_weights=True)
    names = {id(p): n for n, p in lstm.named_parameters()}
    muon, other, no_decay = ([names[id(p)] for p in g["params"]] for g in hidden_matrix_groups(lstm, 0.1))
    assert sorted(muon) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"] and other == []  # recurrent matrices included

    mamba = Mamba(vocab_size=11, d_model=8, n_layer=1)
    names = {id(p): n for n, p in mamba.named_parameters()}
    muon, other, no_decay = ([names[id(p)] for p in g["params"]] for g in hidden_matrix_groups(mamba, 0.1))
    assert any(n.endswith("conv.weight") for n in other)  # 3-D: decayed by AdamW
    assert any(n.endswith("A_log") for n in no_decay) and not any(n.endswith("A_log") for n in muon)
    assert all(dict(mamba.named_parameters())[n].dim() == 2 for n in muon)


FAMILIES = {
    "gpt": lambda: GPT(vocab_size=11, d_model=16, n_layer=2, n_head=2, block_size=8),
    "gpt_moe": lambda: GPT(
        vocab_size=11, d_model=16, n_layer=2, n_head=2, block_size=8, moe={"n_experts": 3, "top_k": 1}
    ),
    "transformer": lambda: TransformerLM(vocab_size=11, d_model=16, n_layer=2, n_head=2, block_size=8),
    "llama": lambda: Llama(vocab_size=11, d_model=16, n_layer=2, n_head=2, n_kv_head=1, block_size=8),
    "rnn": lambda: RecurrentLM(vocab_size=11, d_model=16, n_layer=2, cell="rnn"),
    "gru": lambda: RecurrentLM(vocab_size=11, d_model=16, n_layer=2, cell="gru"),
    "lstm": lambda: RecurrentLM(vocab_size=11, d_model=16, n_layer=2, cell="lstm"),
    "lstm_attn": lambda: LSTMAttentionLM(vocab_size=11, d_model=16, n_layer=2, n_head=2, window=4),
    "mamba": lambda: Mamba(vocab_size=11, d_model=16, n_layer=2, d_state=4, d_conv=3),
    "jamba": lambda: Jamba(
        vocab_size=11, d_model=16, n_layer=2, n_head=2, n_kv_head=1, attn_every=2, attn_offset=1, block_size=8
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_muon_composes_with_every_family(family):
    """One step of every family: Muon gets matrices, every parameter with a gradient moves, nothing breaks."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MuonWithAdamW(hidden_matrix_groups(model, 0.1))
    logits, _ = model(torch.randint(0, 11, (2, 8)))
    aux = model.aux_loss()  # a mixture of experts' balance loss, else None
    (logits.float().pow(2).mean() + (0.0 if aux is None else aux)).backward()
    optimizer.step()
    assert optimizer.muon is not None and optimizer.muon.param_groups[0]["params"]
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[n]), n
        assert torch.isfinite(p).all(), n


def test_lion_moves_every_weight_by_lr_along_the_sign_of_its_momentum():
    model = tiny_gpt()
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    lr, (beta1, beta2), wd = 1e-3, (0.9, 0.99), 0.5
    optimizer = Lion(parameter_groups(model, wd), lr=lr, betas=(beta1, beta2))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    momentum = {name: torch.zeros_like(p) for name, p in reference.items()}

    def both() -> None:
        for name, p in model.named_parameters():
            g, w, m = p.grad, reference[name], momentum[name]
            w.mul_(1 - lr * (wd if id(p) in decayed else 0.0))
            w.sub_(lr * torch.sign(beta1 * m + (1 - beta1) * g))
            momentum[name] = beta2 * m + (1 - beta2) * g
        optimizer.step()

    losses_and_grads(model, 3, both)
    for name, p in model.named_parameters():
        assert torch.allclose(p, reference[name], atol=1e-7, rtol=0), name


def test_schedule_free_adamw_trains_at_y_and_evaluates_its_average_x():
    """Defazio et al.'s algorithm written with x, y and z kept apart: z takes the AdamW-normalised
    step, x averages z with weights lr_max^2, and y = (1 - beta1) z + beta1 x is where gradients are taken."""
    model = tiny_gpt()
    lr, (beta1, beta2), eps, wd, warmup = 1e-2, (0.9, 0.99), 1e-8, 0.1, 2
    optimizer = adamw_schedule_free(parameter_groups(model, wd), lr=lr, betas=(beta1, beta2), warmup_steps=warmup)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    start = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    x, z = dict(start), dict(start)
    v = {name: torch.zeros_like(w) for name, w in start.items()}
    weight_sum, lr_max, step = 0.0, 0.0, 0

    def both() -> None:
        nonlocal weight_sum, lr_max, step
        scheduled = lr * min(1.0, (step + 1) / warmup)
        lr_max = max(lr_max, scheduled)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        for name, p in model.named_parameters():
            g, y = p.grad.double(), (1 - beta1) * z[name] + beta1 * x[name]
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            normalised = g / ((v[name] / (1 - beta2 ** (step + 1))).sqrt() + eps)
            normalised = normalised + (wd if id(p) in decayed else 0.0) * y
            z[name] = z[name] - scheduled * normalised
            x[name] = (1 - c) * x[name] + c * z[name]
        step += 1
        optimizer.step()

    optimizer.train()
    losses_and_grads(model, 4, both)
    for name, p in model.named_parameters():
        y = (1 - beta1) * z[name] + beta1 * x[name]
        assert torch.allclose(p.double(), y, atol=1e-6, rtol=0), name
    optimizer.eval()
    for name, p in model.named_parameters():
        assert torch.allclose(p.double(), x[name], atol=1e-6, rtol=0), name


def test_muon_refuses_a_1d_parameter_in_one_line():
    with pytest.raises(ConfigError, match=r"optimizer=muon got a parameter of shape \(8,\)") as raised:
        MuonWithAdamW([{"params": [nn.Parameter(torch.zeros(8))], "muon": True}])
    assert "\n" not in str(raised.value)


def test_muon_refuses_matrices_that_fsdp_has_sharded_in_one_line():
    model = tiny_gpt()
    decayed = {id(p) for p in model.parameters() if p.dim() == 2}
    model.blocks[0].attn.qkv.weight = nn.Parameter(torch.zeros(16 * 48))  # FSDP's 1-D shard of the matrix
    decayed.add(id(model.blocks[0].attn.qkv.weight))
    with pytest.raises(ConfigError, match="shards them into 1-D pieces") as raised:
        hidden_matrix_groups(model, 0.1, decayed)
    assert "\n" not in str(raised.value)


def test_8bit_adamw_is_refused_on_a_cpu_in_one_line():
    model = tiny_gpt()
    factory = functools.partial(adamw_8bit, lr=1e-3)
    with pytest.raises(ConfigError, match="optimizer=adamw8bit .* this run is on cpu: set trainer=gpu") as raised:
        build_optimizer(factory, model, 0.1, {id(p) for p in model.parameters() if p.dim() == 2}, torch.device("cpu"))
    assert "\n" not in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "schedulefree", "lion"])
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, small_corpus, optimizer):
    """Stopped at step 10 (a validation) and resumed from last.ckpt: the same weights, optimizer state
    and val loss as a run never interrupted."""
    base = [*tiny_overrides("gpt", small_corpus), f"optimizer={optimizer}", "trainer.val_check_interval=5"]
    base += ["trainer.precision=32-true", "model.dropout=0.1"]
    straight = train(compose_config(base, tmp_path / "straight"))
    stop = ["+callbacks.stop._target_=tests.test_checkpoint.StopAtStep", "+callbacks.stop.step=10"]
    assert train(compose_config([*base, *stop], tmp_path / "resumed"))["steps"] == 10
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([*base, f"ckpt_path={last}"], tmp_path / "resumed"))
    assert resumed["steps"] == 20 and resumed["val/loss"] == straight["val/loss"]
    a, b = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True) for run in ("straight", "resumed")
    )
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        assert all(
            torch.equal(torch.as_tensor(state_a[key][k]), torch.as_tensor(state_b[key][k])) for k in state_a[key]
        )
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]


def test_a_checkpoint_saved_while_training_holds_the_averaged_weights_and_eval_mode():
    """A save between validations (Ctrl-C, SIGTERM, every_n_train_steps) finds schedule-free AdamW in
    train mode, its parameters at y: the checkpoint gets x and an optimizer state that says "eval",
    and training goes on from y."""
    model = tiny_gpt()
    optimizer = adamw_schedule_free(parameter_groups(model, 0.1), lr=1e-2, warmup_steps=2)
    optimizer.train()
    losses_and_grads(model, 3, optimizer.step)
    trainer = SimpleNamespace(optimizers=[optimizer])
    y = {name: p.detach().clone() for name, p in model.named_parameters()}
    checkpoint = {"state_dict": dict(model.state_dict()), "optimizer_states": [optimizer.state_dict()]}
    EvalWeights().on_save_checkpoint(trainer, model, checkpoint)
    optimizer.eval()  # x again, from y as the save left it (equal to the last bit or so)
    x = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.train()
    assert max((x[name] - y[name]).abs().max() for name in x) > 1e-4  # far apart, next to the tolerance below
    assert all(torch.allclose(checkpoint["state_dict"][name], x[name], atol=1e-7, rtol=0) for name in x)
    assert torch.equal(checkpoint["state_dict"]["lm_head.weight"], checkpoint["state_dict"]["wte.weight"])  # tied
    assert all(group["train_mode"] is False for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert all(torch.allclose(p, y[name], atol=1e-7) for name, p in model.named_parameters())  # back at y
    assert optimizer.param_groups[0]["train_mode"] is True


@pytest.mark.slow
def test_the_speedrun_recipe_composes_its_levers_and_runs_shrunk_on_a_cpu(tmp_path, small_corpus):
    cfg = compose_config(["experiment=shakespeare_char_speedrun"], tmp_path / "composed")
    assert cfg.task.optimizer._target_ == "lmlab.optim.MuonWithAdamW"
    assert cfg.task.scheduler._target_ == "lmlab.optim.warmup_stable_decay"
    assert cfg.task.scheduler.decay_shape == "1-sqrt" and cfg.trainer.max_steps == 1250
    options = ("qk_norm", "relu_squared", "zero_init_projections")
    assert all(cfg.model[key] is True for key in options) and cfg.model.tie_weights is False
    full = GPT(
        vocab_size=65, **{k: cfg.model[k] for k in ("d_model", "n_layer", "n_head", "tie_weights")}, block_size=256
    )
    assert sum(p.numel() for p in full.parameters()) - full.wpe.weight.numel() <= 10_700_000  # nanoGPT's count
    shrunk = [
        "experiment=shakespeare_char_speedrun",
        *tiny_overrides("gpt", small_corpus),
        "trainer=cpu",
        "trainer.precision=32-true",
        "perf.compile=false",
        "data.splits=[0.9,0.05,0.05]",
    ]
    metrics = train(compose_config(shrunk, tmp_path / "run"))
    assert metrics["status"] == "completed" and metrics["steps"] == 20 and math.isfinite(metrics["test/bpb"])


def test_eval_weights_evaluates_the_average_and_trains_the_interpolation():
    """Validation, test and the end of training see x; each training batch sees y; other optimizers are left alone."""
    model = tiny_gpt()
    optimizer = adamw_schedule_free(parameter_groups(model, 0.1), lr=1e-2)
    trainer, callback = SimpleNamespace(optimizers=[optimizer]), EvalWeights()
    callback.on_train_batch_start(trainer, model, None, 0)
    losses_and_grads(model, 2, optimizer.step)
    y = [p.detach().clone() for p in model.parameters()]
    hooks = {
        "validation": lambda: callback.on_validation_start(trainer, model),
        "test": lambda: callback.on_test_start(trainer, model),
        "end of training": lambda: callback.on_train_end(trainer, model),
    }
    for when, hook in hooks.items():
        hook()
        assert optimizer.param_groups[0]["train_mode"] is False, when
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), y)), when
        callback.on_train_batch_start(trainer, model, None, 0)
        assert optimizer.param_groups[0]["train_mode"] is True
        assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(model.parameters(), y)), when
    adamw = torch.optim.AdamW(model.parameters())
    callback.on_validation_start(SimpleNamespace(optimizers=[adamw]), model)  # no eval(): nothing to do


@pytest.mark.parametrize(("experiment", "points"), [("compare_optimizers", 3), ("compare_optimizers_gpu", 4)])
def test_each_optimizer_of_a_comparison_sweeps_its_own_grid_of_rates(tmp_path, experiment, points):
    rates = {}
    for optimizer in ("adamw", "muon", "schedulefree", "lion"):
        for point in range(1, points + 1):
            cfg = compose_config(
                [f"experiment={experiment}", f"optimizer={optimizer}", f"lr_grid.point=r{point}"], tmp_path
            )
            rates.setdefault(optimizer, []).append(cfg.task.optimizer.lr)
    assert rates["muon"] == sorted(rates["muon"]) and rates["muon"] != rates["adamw"]
    assert all(len(set(grid)) == points for grid in rates.values())


def test_the_report_groups_the_runs_of_one_grid_and_picks_their_rate(tmp_path):
    """Runs that differ only in lr_grid.point (and so in the rate) form one group, as a swept rate's runs do."""
    import dataclasses
    import json

    import yaml

    from lmlab.report.runs import load_run
    from lmlab.report.tuning import choose_learning_rates

    runs = []
    for point, lr, val in (("r1", 0.01, 3.0), ("r2", 0.03, 2.5), ("r3", 0.1, 2.8)):
        run = tmp_path / point
        run.mkdir()
        config = {"names": {"model": "gpt", "tokenizer": "char"}, "lr_grid": {"point": point, "rates": {}}}
        config["task"] = {"optimizer": {"_target_": "lmlab.optim.MuonWithAdamW", "lr": lr}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = {"model": "gpt", "tokenizer": "char", "status": "completed", "val/bpb": val, "test/bpb": val}
        (run / "metrics.json").write_text(json.dumps(metrics))
        runs.append(dataclasses.replace(load_run(run), label=f"lr_grid.point={point},model=gpt,optimizer=muon"))
    (choice,) = choose_learning_rates(runs)
    assert choice.grid == (0.01, 0.03, 0.1) and choice.lr == 0.03 and choice.setting == "optimizer=muon"

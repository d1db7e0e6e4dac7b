"""Scaling-law fits (lmlab.report.fit, fit_report, compare.py --fit) on runs made from known laws."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmlab.errors import ConfigError
from lmlab.report import find_runs, write_report
from lmlab.report.fit import (
    ChinchillaLaw,
    ComputeLaw,
    bootstrap,
    check_flops,
    crossing,
    fit_chinchilla,
    fit_compute_law,
    fit_parabola,
    interval,
)
from lmlab.report.fit_points import runs_from_csv
from lmlab.report.fit_report import FitRequest, analyse, predict
from tests.commands import run_command
from tests.helpers import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRUE_COMPUTE = ComputeLaw(E=1.2, A=300.0, alpha=0.25)
TRUE_CHINCHILLA = {"E": 1.0, "A": 50.0, "alpha": 0.35, "B": 200.0, "beta": 0.3}


def chinchilla_loss(params, tokens):
    t = TRUE_CHINCHILLA
    return t["E"] + t["A"] * np.power(params, -t["alpha"]) + t["B"] * np.power(tokens, -t["beta"])


def noisy(values, seed: int, scale: float = 0.002):
    return np.asarray(values) * np.exp(np.random.default_rng(seed).normal(0.0, scale, np.shape(values)))


def fake_run(
    root: Path,
    name: str,
    *,
    model: str,
    params: float,
    tokens: float,
    flops: float,
    bpb: float,
    corpus: str = "abc123",
    tokenizer: str = "char",
) -> Path:
    """A finished run as the report reads it: config.yaml, metrics.json and run_info.json."""
    run = root / name
    run.mkdir(parents=True)
    config = {"seed": 1, "model": {"n": name}, "task": {"optimizer": {"lr": 1e-3}}, "paths": {"output_dir": str(run)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {
        "model": model,
        "tokenizer": tokenizer,
        "status": "completed",
        "params": params,
        "tokens_seen": tokens,
        "bytes_seen": tokens,
        "train_flops": flops,
        "val/bpb": bpb + 0.01,
        "test/bpb": bpb,
        "test/unk_rate": 0.0,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "run_info.json").write_text(json.dumps({"seed": 1, "corpus_sha256": corpus}))
    return run


def chinchilla_sweep(root: Path, model: str = "gpt", seed: int = 0) -> None:
    """4 sizes x 4 compute budgets from the known law (C = 6 N D), with 0.2% noise."""
    for i, params in enumerate((1e4, 3e4, 1e5, 3e5)):
        for j, flops in enumerate((1e11, 1e12, 1e13, 1e14)):
            tokens = flops / (6 * params)
            bpb = float(noisy(chinchilla_loss(params, tokens), seed * 100 + 4 * i + j))
            fake_run(
                root,
                f"model={model},n={params:g},c={flops:g}",
                model=model,
                params=params,
                tokens=tokens,
                flops=flops,
                bpb=bpb,
            )


def compute_sweep(
    root: Path,
    model: str,
    law: ComputeLaw,
    budgets=(1e10, 1e11, 1e12, 1e13, 1e14),
    last_offset: float = 0.0,
    noise_seed: int | None = None,
):
    """One run per budget on the frontier `law` (the largest budget shifted by `last_offset`), exact
    or with 0.2% noise."""
    for k, flops in enumerate(budgets):
        offset = last_offset if k == len(budgets) - 1 else 0.0
        bpb = float(law(flops) if noise_seed is None else noisy(law(flops), noise_seed + k)) + offset
        fake_run(root, f"model={model},c={flops:g}", model=model, params=1e5, tokens=flops / 6e5, flops=flops, bpb=bpb)


# --- the laws recover what made the data -------------------------------------------------------


def test_the_compute_law_recovers_known_exponents():
    flops = np.logspace(10, 14, 8)
    law = fit_compute_law(flops, noisy(TRUE_COMPUTE(flops), seed=1))
    assert law.alpha == pytest.approx(0.25, abs=0.02)
    assert pytest.approx(1.2, abs=0.03) == law.E


def test_the_chinchilla_law_recovers_known_exponents_and_its_bootstrap_covers_them():
    params, tokens = (grid.ravel() for grid in np.meshgrid(np.logspace(4, 7, 5), np.logspace(6, 9, 5)))
    loss = noisy(chinchilla_loss(params, tokens), seed=2)
    law = fit_chinchilla(params, tokens, loss)
    assert law.alpha == pytest.approx(0.35, abs=0.02)
    assert law.beta == pytest.approx(0.30, abs=0.02)
    assert pytest.approx(1.0, abs=0.05) == law.E
    draws = bootstrap(lambda i: fit_chinchilla(params[i], tokens[i], loss[i], law), len(loss), resamples=30)
    assert len(draws) == 30
    for name in ("alpha", "beta"):
        low, high = interval([getattr(d, name) for d in draws])
        assert low <= TRUE_CHINCHILLA[name] <= high and high - low < 0.05


def test_the_compute_optimal_split_minimises_the_law_on_its_budget():
    params, tokens = (grid.ravel() for grid in np.meshgrid(np.logspace(4, 7, 5), np.logspace(6, 9, 5)))
    law = fit_chinchilla(params, tokens, chinchilla_loss(params, tokens))
    n_opt, d_opt = law.optimal(1e17, 6.0)
    assert 6 * n_opt * d_opt == pytest.approx(1e17)
    assert law(n_opt, d_opt) < min(law(n_opt * f, d_opt / f) for f in (0.8, 1.25))


def test_the_isoflop_parabola_finds_the_best_size():
    params = np.logspace(4, 6, 5)
    loss = 2.0 + 0.1 * (np.log(params) - math.log(1e5)) ** 2
    assert fit_parabola(params, loss).optimal_params == pytest.approx(1e5, rel=1e-6)
    assert math.isnan(fit_parabola(params, 3.0 - 0.1 * (np.log(params) - 11) ** 2).optimal_params)


def test_two_frontiers_cross_where_they_are_equal():
    steep, flat = ComputeLaw(1.0, 1000.0, 0.3), ComputeLaw(1.5, 30.0, 0.15)
    where = crossing(steep, flat, 1e6)
    assert steep(where) == pytest.approx(flat(where), abs=1e-9)
    assert crossing(steep, ComputeLaw(0.5, 1000.0, 0.3), 1e6) is None  # always apart


# --- refusals, each in one line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fit", "match"),
    [
        (lambda: fit_compute_law(np.array([1e12]), np.array([2.0])), "to one compute budget"),
        (lambda: fit_compute_law(np.array([1e12, 1e13]), np.array([2.0, 1.9])), r"\(3 parameters\) to 2 compute"),
        (lambda: fit_chinchilla(*np.ones((3, 4)) * [[1e4], [1e6], [2.0]]), "to one"),
        (lambda: fit_chinchilla(np.logspace(4, 6, 6), 1e12 / np.logspace(4, 6, 6), np.full(6, 2.0)), "move together"),
        (lambda: fit_compute_law(np.array([1e12, 1e13, -1.0]), np.array([2.0, 1.9, 1.8])), "not positive"),
        (lambda: check_flops(0.0), "positive number of FLOPs"),
        (lambda: check_flops(1e40), "up to 1e"),
        (lambda: check_flops(math.nan), "positive number of FLOPs"),
    ],
)
def test_fits_refuse_what_they_cannot_fit(fit, match):
    with pytest.raises(ConfigError, match=match):
        fit()


def test_runs_on_different_text_are_refused(tmp_path):
    compute_sweep(tmp_path, "gpt", TRUE_COMPUTE)
    fake_run(tmp_path, "other", model="gpt", params=1e5, tokens=1e6, flops=3e11, bpb=2.0, corpus="def456")
    with pytest.raises(ConfigError, match="different text"):
        analyse(find_runs([tmp_path]), FitRequest(resamples=5))


# --- the report --------------------------------------------------------------------------------


def test_a_predictive_family_and_one_that_is_not(tmp_path):
    compute_sweep(tmp_path, "gpt", TRUE_COMPUTE)
    compute_sweep(tmp_path, "lstm", ComputeLaw(1.0, 600.0, 0.25), last_offset=0.2)
    analysis = analyse(find_runs([tmp_path]), FitRequest(resamples=20))
    held = {f.model: f.held_out[0] for f in analysis.families}
    assert held["gpt"].law == "compute frontier" and held["gpt"].flops == 1e14
    assert held["gpt"].measured == pytest.approx(TRUE_COMPUTE(1e14))
    assert abs(held["gpt"].error) < 0.01 and held["gpt"].predictive
    assert held["lstm"].error == pytest.approx(-0.2, abs=0.02) and not held["lstm"].predictive


def test_predictions_carry_intervals_and_say_where_n_and_d_are_unknown(tmp_path):
    budgets = np.logspace(10, 14, 9)
    compute_sweep(tmp_path, "gpt", TRUE_COMPUTE, budgets, noise_seed=3)
    (family,) = analyse(find_runs([tmp_path]), FitRequest(resamples=50)).families
    prediction = predict(family, 1e17)
    assert prediction.loss == pytest.approx(float(TRUE_COMPUTE(1e17)), abs=0.03)
    low, high = prediction.loss_interval
    assert low < prediction.loss < high and low < float(TRUE_COMPUTE(1e17)) < high
    assert math.isnan(prediction.params) and "no Chinchilla fit" in prediction.note


def test_crossings_are_named_or_left_undecided(tmp_path):
    budgets = np.logspace(10, 13, 10)
    gpt, lstm = ComputeLaw(1.5, 100.0, 0.3), ComputeLaw(1.2, 10.0, 0.1)  # meet near 1.7e15, beyond the runs
    compute_sweep(tmp_path / "crossing", "gpt", gpt, budgets, noise_seed=4)
    compute_sweep(tmp_path / "crossing", "lstm", lstm, budgets, noise_seed=5)
    (found,) = analyse(find_runs([tmp_path / "crossing"]), FitRequest(resamples=50)).crossings
    truth = crossing(gpt, lstm, 1e10)
    assert found.verdict.startswith("cross at") and found.interval[0] < truth < found.interval[1]
    compute_sweep(tmp_path / "apart", "gpt", gpt, budgets)
    compute_sweep(tmp_path / "apart", "lstm", ComputeLaw(1.0, 100.0, 0.3), budgets)
    (apart,) = analyse(find_runs([tmp_path / "apart"]), FitRequest(resamples=20)).crossings
    assert apart.verdict.startswith("do not cross")


def test_compare_py_fits_a_sweep_end_to_end(tmp_path):
    chinchilla_sweep(tmp_path / "sweep", "gpt")
    out = tmp_path / "out"
    result = run_command(
        [
            sys.executable,
            "compare.py",
            str(tmp_path / "sweep"),
            "--out",
            str(out),
            "--predict-flops",
            "1e17",
            "--fit-resamples",
            "10",
        ],
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = (out / "comparison.md").read_text()
    for heading in ("Compute frontier", "Chinchilla", "IsoFLOP minima", "Held out", "Predicted at 1e+17"):
        assert f"### {heading}" in markdown
    assert "N and D from the Chinchilla law" in markdown
    assert (out / "fit.png").read_bytes().startswith(PNG_MAGIC)


def test_compare_py_refuses_an_absurd_compute_in_one_line(tmp_path):
    compute_sweep(tmp_path, "gpt", TRUE_COMPUTE)
    result = run_command(
        [sys.executable, "compare.py", str(tmp_path), "--predict-flops", "-1"],
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: --predict-flops")
    assert "Traceback" not in result.stderr


def test_a_sweep_gets_the_fit_section_only_when_it_spans_sizes_or_budgets(tmp_path):
    compute_sweep(tmp_path / "spans", "gpt", TRUE_COMPUTE)
    report = write_report([tmp_path / "spans"], tmp_path / "spans", fit=FitRequest(resamples=5, only_if_spanning=True))
    assert "## Scaling-law fits" in report.markdown and (tmp_path / "spans" / "fit.png").is_file()
    fake_run(tmp_path / "one", "a", model="gpt", params=1e5, tokens=1e6, flops=6e11, bpb=2.0)
    fake_run(tmp_path / "one", "b", model="lstm", params=1e5, tokens=1e6, flops=6e11, bpb=2.1)
    report = write_report([tmp_path / "one"], tmp_path / "one", fit=FitRequest(resamples=5, only_if_spanning=True))
    assert "Scaling-law fits" not in report.markdown and not (tmp_path / "one" / "fit.png").exists()


def test_a_published_comparison_csv_is_fitted_at_each_sizes_chosen_rate(tmp_path):
    compute_sweep(tmp_path / "sweep", "gpt", TRUE_COMPUTE)
    write_report([tmp_path / "sweep"], tmp_path / "sweep")
    runs = runs_from_csv(tmp_path / "sweep" / "comparison.csv")
    (family,) = analyse(runs, FitRequest(resamples=5)).families
    assert len(family.points) == 5 and family.compute.alpha == pytest.approx(0.25, abs=0.01)


def test_a_law_with_as_many_points_as_parameters_claims_no_interval(tmp_path):
    compute_sweep(tmp_path, "gpt", TRUE_COMPUTE, budgets=(1e10, 1e12, 1e14))
    (family,) = analyse(find_runs([tmp_path]), FitRequest(resamples=20)).families
    assert family.compute is not None and family.compute_draws == []
    assert "no interval" in family.notes["compute"]
    assert all(math.isnan(bound) for bound in predict(family, 1e17).loss_interval)


def test_the_frontier_goes_through_each_budgets_best_run(tmp_path):
    compute_sweep(tmp_path, "gpt", TRUE_COMPUTE)
    for flops in (1e10, 1e11, 1e12, 1e13, 1e14):  # a worse size at every budget
        bpb = float(TRUE_COMPUTE(flops)) + 0.3
        fake_run(tmp_path, f"big,c={flops:g}", model="gpt", params=4e5, tokens=flops / 2.4e6, flops=flops, bpb=bpb)
    (family,) = analyse(find_runs([tmp_path]), FitRequest(resamples=5)).families
    assert len(family.points) == 10 and family.budgets == 5
    assert family.compute.alpha == pytest.approx(0.25, abs=0.01) and pytest.approx(1.2, abs=0.01) == family.compute.E


def test_the_chinchilla_prediction_finds_the_true_compute_optimal_size(tmp_path):
    chinchilla_sweep(tmp_path, "gpt")
    (family,) = analyse(find_runs([tmp_path]), FitRequest(resamples=50)).families
    prediction = predict(family, 1e15)
    truth = ChinchillaLaw(**TRUE_CHINCHILLA)
    params, tokens = truth.optimal(1e15, 6.0)
    assert family.flops_per_param_token == pytest.approx(6.0)
    assert prediction.params_interval[0] < params < prediction.params_interval[1]
    assert prediction.tokens_interval[0] < tokens < prediction.tokens_interval[1]
    assert prediction.chinchilla == pytest.approx(truth(params, tokens), abs=0.02)
    low, high = prediction.chinchilla_interval
    assert low < truth(params, tokens) < high


def test_a_floor_the_runs_never_approach_is_flagged(tmp_path):
    compute_sweep(tmp_path, "gpt", ComputeLaw(E=1e-9, A=30.0, alpha=0.1))  # a pure power law: no floor in sight
    report = write_report([tmp_path], tmp_path, fit=FitRequest(resamples=5))
    assert "E at its lower bound: the runs do not show where the loss levels off" in report.markdown

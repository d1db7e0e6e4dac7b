"""lm-evaluation-harness on lmlab checkpoints (gpt, lstm, mamba), offline, on the small tasks in tests/assets/harness."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmlab.errors import ConfigError
from tests.commands import run_command
from tests.helpers import REPO, compose_config, tiny_overrides

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from lmlab.harness import LmlabLM  # noqa: E402
from lmlab.harness.run import harness_from_config  # noqa: E402
from lmlab.run.evaluate import evaluate_from_config  # noqa: E402

TASKS = REPO / "tests" / "assets" / "harness"
PASSAGES = [json.loads(line)["text"] for line in (TASKS / "tiny_text.jsonl").read_text().splitlines()]
FAMILIES = ["gpt", "lstm", "mamba"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """A tiny run of each family, in fp32 so that evaluate.py (fp32) scores what the adapter scores."""
    from lmlab.run.train import train

    found = {}
    for family in FAMILIES:
        run = tmp_path_factory.mktemp(family) / "run"
        train(compose_config([*tiny_overrides(family, small_corpus, steps=10), "trainer.precision=32-true"], run))
        found[family] = run / "checkpoints" / "last.ckpt"
    return found


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def evaluate_py_nats(ckpt: Path, text: str, tmp_path: Path) -> float:
    """Total nats of `text` as evaluate.py scores a file holding it."""
    path = tmp_path / "passage.txt"
    path.write_text(text)
    cfg = OmegaConf.create(
        {
            "ckpt": str(ckpt),
            "data": {"path": str(path), "block_size": None, "batch_size": None},
            "device": "cpu",
            "output": str(tmp_path / "eval.json"),
        }
    )
    result = evaluate_from_config(cfg)
    return result["loss"] * result["tokens"]


def test_lmlab_is_registered_with_lm_eval():
    assert get_model("lmlab") is LmlabLM


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_rolling_log_likelihoods_equal_evaluate_py(family, checkpoints, tmp_path):
    lm = LmlabLM(ckpt=str(checkpoints[family]), device="cpu")
    ours = lm.loglikelihood_rolling([request("loglikelihood_rolling", text) for text in PASSAGES[:2]])
    for text, value in zip(PASSAGES[:2], ours):
        assert value == pytest.approx(-evaluate_py_nats(checkpoints[family], text, tmp_path), abs=1e-4)


def direct_logprob(lm: LmlabLM, context: str, continuation: str) -> float:
    """The continuation's log-probability from one forward pass over the whole text (it fits every model)."""
    ids = [lm.start_id, *lm.tokenizer.encode(context + continuation).tolist()]
    n_context = 1 + len(lm.tokenizer.encode(context))
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids[:-1]]))
    logprobs = F.log_softmax(logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(n_context, len(ids)))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_reads_the_whole_context(family, checkpoints):
    """Recurrent and state-space models carry their state over windows of 4 tokens: the same numbers as one pass."""
    lm = LmlabLM(ckpt=str(checkpoints[family]), device="cpu", block_size=4)
    context, continuation = "Citizen:\nBefore", " we proceed."  # 28 characters: within gpt's context of 32
    ((logprob, greedy),) = lm.loglikelihood([request("loglikelihood", context, continuation)])
    assert logprob == pytest.approx(direct_logprob(lm, context, continuation), abs=1e-4)
    assert isinstance(greedy, bool) and logprob < 0


@pytest.mark.slow
def test_a_continuation_longer_than_an_attention_models_context_is_scored_in_strides(checkpoints):
    lm = LmlabLM(ckpt=str(checkpoints["gpt"]), device="cpu")  # context: 32 tokens (characters)
    continuation = " " + PASSAGES[0][:80]
    ((logprob, _),) = lm.loglikelihood([request("loglikelihood", "Speak:", continuation)])
    assert math.isfinite(logprob) and logprob < 0
    # every continuation character is scored once: more text, lower log-probability
    ((shorter, _),) = lm.loglikelihood([request("loglikelihood", "Speak:", continuation[:40])])
    assert logprob < shorter


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lstm", "mamba"])
def test_lm_eval_runs_the_local_tasks(family, checkpoints):
    """lm_eval's own evaluation loop over the three request types; its bits per byte is lmlab's."""
    from lm_eval.tasks import TaskManager

    lm = LmlabLM(ckpt=str(checkpoints[family]), device="cpu")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["lmlab_tiny_choice", "lmlab_tiny_rolling", "lmlab_tiny_gen"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=False,
    )["results"]
    assert 0.0 <= results["lmlab_tiny_choice"]["acc,none"] <= 1.0
    assert results["lmlab_tiny_gen"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    nats = -sum(lm.loglikelihood_rolling([request("loglikelihood_rolling", text) for text in PASSAGES]))
    n_bytes = sum(len(text.encode()) for text in PASSAGES)
    assert results["lmlab_tiny_rolling"]["bits_per_byte,none"] == pytest.approx(nats / math.log(2) / n_bytes)


@pytest.mark.slow
def test_evaluate_py_runs_harness_tasks_and_writes_json(checkpoints, tmp_path):
    output = tmp_path / "harness.json"
    command = [
        sys.executable,
        "evaluate.py",
        f"ckpt={checkpoints['gpt']}",
        "harness.tasks=[lmlab_tiny_choice,lmlab_tiny_rolling,lmlab_tiny_gen]",
        f"harness.include_path={TASKS}",
        "harness.limit=3",
        "device=cpu",
        f"output={output}",
    ]
    result = run_command(command, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert written["model"] == "gpt" and written["tasks"] == [
        "lmlab_tiny_choice",
        "lmlab_tiny_rolling",
        "lmlab_tiny_gen",
    ]
    assert {"acc,none", "bits_per_byte,none", "exact_match,none"} <= {
        key for scores in written["results"].values() for key in scores
    }
    assert "lmlab_tiny_rolling" in result.stdout and "bits_per_byte" in result.stdout


def test_an_unknown_task_is_refused_in_one_line(tmp_path):
    cfg = OmegaConf.create(
        {
            "ckpt": str(tmp_path / "never_read.ckpt"),  # tasks are checked before the checkpoint is loaded
            "data": {"block_size": None, "batch_size": None},
            "device": "cpu",
            "output": None,
            "harness": {"tasks": ["no_such_task_xyz"], "num_fewshot": None, "limit": None, "include_path": str(TASKS)},
        }
    )
    with pytest.raises(ConfigError) as error:
        harness_from_config(cfg)
    assert "\n" not in str(error.value) and "no_such_task_xyz" in str(error.value)

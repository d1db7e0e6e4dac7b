"""`python evaluate.py harness.tasks=[...]`: lm-evaluation-harness tasks on a checkpoint, results as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint import verify_hash_setting
from lmlab.errors import ConfigError
from lmlab.io import atomic_write_json


def default_harness_output(ckpt: str | Path, tasks: list[str]) -> Path:
    """`<run dir>/harness-<tasks>.json` for a checkpoint in `<run dir>/checkpoints/`, else beside the checkpoint."""
    folder = Path(ckpt).expanduser().resolve().parent
    name = "harness-" + "-".join(tasks)[:80] + ".json"
    return (folder.parent if folder.name == "checkpoints" else folder) / name


def harness_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt` on `cfg.harness.tasks`, print lm_eval's table, write its results; return them."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError(
            "ckpt is not set: pass ckpt=PATH of a checkpoint, e.g. outputs/runs/<run>/checkpoints/last.ckpt"
        )
    harness = cfg.harness
    tasks = [str(task) for task in harness.tasks]
    if not tasks:
        raise ConfigError("harness.tasks is empty: name at least one task, e.g. harness.tasks=[lambada_openai]")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmlab.harness import LmlabLM  # a one-line error if lm_eval is missing

    manager = TaskManager(include_path=str(harness.include_path) if harness.get("include_path") else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"harness.tasks: no task named {', '.join(unknown)}; `lm_eval ls tasks` lists them "
            "(add harness.include_path=FOLDER for your own task YAMLs)"
        )
    asked = cfg.get("eval") or {}
    model = LmlabLM(
        ckpt=cfg.ckpt,
        device=cfg.device,
        block_size=cfg.data.block_size,
        eval_batch_size=cfg.data.batch_size,
        eval_context=asked.get("context"),
        eval_stride=asked.get("stride"),
        verify_checkpoint_hash=verify_hash_setting(cfg),
    )
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=harness.get("num_fewshot"),
        limit=harness.get("limit"),
        task_manager=manager,
        log_samples=False,
    )
    summary = {
        "checkpoint": str(cfg.ckpt),
        "step": model.loaded.step,
        "model": model.loaded.config["names"]["model"],
        "tokenizer": model.tokenizer.name,
        "tasks": tasks,
        "results": json.loads(json.dumps(results["results"], default=str)),
    }
    output = Path(cfg.output) if cfg.get("output") else default_harness_output(cfg.ckpt, tasks)
    atomic_write_json(output, summary)
    print(results_table(summary["results"]))
    print(f"wrote {output}")
    return summary


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per task and metric: `task  metric  value ± stderr` (lm_eval's keys are `metric,filter`)."""
    lines = []
    for task, scores in results.items():
        for key, value in scores.items():
            metric, comma, _ = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue  # name, alias, sample_len; stderrs go beside their metric
            stderr = scores.get(key.replace(metric, f"{metric}_stderr", 1))
            spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            lines.append(f"{task:<28} {metric:<18} {value:.4f}{spread}")
    return "\n".join(lines)

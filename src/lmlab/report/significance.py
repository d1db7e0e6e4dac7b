"""The report's "Is the difference real?" rows: the best choice against each other, by paired bootstrap."""

from __future__ import annotations

from typing import Any

from lmlab.errors import ConfigError
from lmlab.report.blocks import BLOCKS_FILE, load_test_blocks
from lmlab.report.bootstrap import mean_blocks, paired_bootstrap
from lmlab.report.tuning import Choice


def _blocks(choice: Choice):
    blocks = [load_test_blocks(run.path) for run in choice.runs]
    if not blocks or any(b is None for b in blocks):
        raise ConfigError(f"no {BLOCKS_FILE} in its run directory (a run made without the SaveTestBlocks callback)")
    return mean_blocks(blocks)


def significance_rows(choices: list[Choice], seed: int = 0) -> list[dict[str, Any]]:
    """For the best choice that pays for every byte against each other completed choice: the test bpb
    difference, its 95% paired-bootstrap interval and the verdict (or why there is none)."""
    scored = [c for c in choices if c.runs]
    honest = [c for c in scored if not c.optimistic]
    if not honest:
        return []
    best = honest[0]
    try:
        reference = _blocks(best)
    except ConfigError as err:
        return [{"run": best.name, "verdict": f"no bootstrap for the best run: {err}"}]
    rows = []
    for other in scored:
        if other is best:
            continue
        row: dict[str, Any] = {"run": other.name + (" (optimistic)" if other.optimistic else "")}
        try:
            interval = paired_bootstrap(reference, _blocks(other), seed=seed, names=(best.name, other.name))
        except ConfigError as err:
            row["verdict"] = str(err)
        else:
            row.update(
                difference=interval.difference,
                interval=f"[{interval.low:+.4f}, {interval.high:+.4f}]",
                verdict="significant" if interval.significant else "not significant",
            )
        rows.append(row)
    return rows

"""Compare finished runs: a table ranked by bits per byte, and plots, from sweep or run directories.

    python compare.py outputs/multirun/2025-01-01_12-00-00            # writes into that directory
    python compare.py outputs/runs/*gpt* outputs/runs/*lstm* --out outputs/comparisons/gpt-vs-lstm

Sweeps (`python train.py -m ...`) write the same report on their own when their last job ends.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from lmlab.cli import user_errors
from lmlab.report import runs_table, write_report


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare lmlab runs: comparison.csv, comparison.md and plots.")
    parser.add_argument("paths", nargs="+", type=Path, help="sweep directories and/or run directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the report (default: the directory given, if one; else outputs/comparisons/<time>)",
    )
    parser.add_argument(
        "--mixed-eval",
        action="store_true",
        help="rank runs scored with different eval.context protocols together (refused by default)",
    )
    args = parser.parse_args(argv)
    out = args.out or (
        args.paths[0] if len(args.paths) == 1 else Path("outputs/comparisons") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    )

    report = write_report(args.paths, out, mixed_eval=args.mixed_eval)
    print(runs_table(report.runs))
    print(f"\nwrote {', '.join(str(path) for path in report.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

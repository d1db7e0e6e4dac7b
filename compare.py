"""Compare finished runs: a table ranked by bits per byte, and plots, from sweep or run directories.

    python compare.py outputs/multirun/2025-01-01_12-00-00            # writes into that directory
    python compare.py outputs/runs/*gpt* outputs/runs/*lstm* --out outputs/comparisons/gpt-vs-lstm
    python compare.py outputs/multirun/<time> --fit --predict-flops 1e17   # scaling-law fits and a prediction
    python compare.py docs/results/scaling_gpu/comparison.csv --fit       # fits of a published table: fit.md

Sweeps (`python train.py -m ...`) write the same report on their own when their last job ends, with
the fits when they run some family at several sizes or budgets.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from lmlab.cli import user_errors
from lmlab.errors import ConfigError
from lmlab.report import runs_table, write_report
from lmlab.report.comparison import write_fit
from lmlab.report.fit_points import runs_from_csv
from lmlab.report.fit_report import METRICS, RESAMPLES, FitRequest


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare lmlab runs: comparison.csv, comparison.md and plots.")
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="sweep directories and/or run directories (or, with --fit, comparison.csv files)",
    )
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
    parser.add_argument("--fit", action="store_true", help="fit scaling laws per model x tokenizer (fit.png)")
    parser.add_argument(
        "--predict-flops",
        type=float,
        default=None,
        help="predict each family's bits per byte at this training compute (implies --fit)",
    )
    parser.add_argument("--fit-metric", choices=METRICS, default="test/bpb", help="the score the laws are fitted to")
    parser.add_argument("--fit-resamples", type=int, default=RESAMPLES, help="bootstrap refits behind each interval")
    args = parser.parse_args(argv)
    fit = (
        FitRequest(args.fit_metric, args.predict_flops, args.fit_resamples)
        if args.fit or args.predict_flops is not None
        else None
    )
    tables = [path for path in args.paths if path.suffix == ".csv"]
    default_out = args.paths[0].parent if tables else args.paths[0]
    out = args.out or (
        default_out if len(args.paths) == 1 else Path("outputs/comparisons") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    )
    if tables:
        if fit is None or len(tables) != len(args.paths):
            raise ConfigError(
                "a comparison.csv can only be fitted: pass --fit with comparison.csv files only, or run directories"
            )
        report = write_fit([run for table in tables for run in runs_from_csv(table)], out, fit)
        print(report.markdown)
    else:
        report = write_report(args.paths, out, mixed_eval=args.mixed_eval, fit=fit)
        print(runs_table(report.runs))
    print(f"\nwrote {', '.join(str(path) for path in report.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`h3fusion aggregate`: runs that differ only in their training seed (`h3fusion run --seed N`),
from each run's eval/report.json (pipeline.eval.aggregate): every score and fused − other
difference with one interval over seeds × items (a run resampled as a cluster) beside its sd
across the runs, and the per-seed tables."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, type=Path, metavar="RUN_DIR",
                        help="run dirs of the same config with different --seed (same eval items)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output dir for aggregate.json and aggregate.md")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")


def main(args: argparse.Namespace) -> int:
    from ..eval.aggregate import write_aggregate

    agg = write_aggregate(args.runs, args.out, overwrite=args.overwrite)
    print((args.out / "aggregate.md").read_text())
    print(f"aggregate: {args.out / 'aggregate.md'}  ({agg['n_seeds']} runs)")
    return 0

"""`h3fusion merge`: the merging baselines (average, task arithmetic, TIES) of the run's experts."""
from __future__ import annotations

import argparse

from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..registry import MERGE_METHODS
    add_config_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=MERGE_METHODS,
                        help="methods to run (default: merge.methods of the config)")
    parser.add_argument("--overwrite", action="store_true")


def main(args: argparse.Namespace) -> int:
    from ..surgery.stage import merge_run_experts
    cfg = config_from_args(args, "merge")
    merge_run_experts(cfg, args.run_dir, methods=args.methods, overwrite=args.overwrite)
    return 0

"""`h3fusion ensemble`: the LLM-ensemble baselines (probability averaging, per-prompt routing,
the oracle router; pipeline.registry.ENSEMBLES)."""
from __future__ import annotations

import argparse

from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..registry import ENSEMBLES
    add_config_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=ENSEMBLES,
                        help="ensembles to build (default: all of them)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild finished ensembles")


def main(args: argparse.Namespace) -> int:
    from ..ensemble.stage import build_run_ensembles
    cfg = config_from_args(args)
    build_run_ensembles(cfg, args.run_dir, methods=args.methods, overwrite=args.overwrite)
    return 0

"""`h3fusion fuse`: stage 2, train the fused MoE (router, optional experts)."""
from __future__ import annotations

import argparse
import logging
import sys

from ..layout import RunLayout
from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--init", default=None, help="H3Fusion MoE to train (default <run>/fused_init)")
    parser.add_argument("--out", default=None, help="trained model dir (default <run>/fused)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in <run>/fused_ds to continue from (without it, "
                             "an existing checkpoint is resumed too, a missing one starts fresh)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    from ..train.fusion.stage import FusionPaths, train_fusion
    from ..train.fusion.loop import NonFiniteLossError
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args, "fusion")
    paths = FusionPaths.for_run(RunLayout.at(args.run_dir), args.init, args.out)
    try:
        return train_fusion(cfg, paths, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as exc:
        print(f"h3fusion fuse: error: {exc}", file=sys.stderr, flush=True)
        return 3

"""`h3fusion fuse`: stage 2, train the fused MoE (router, optional experts)."""
from __future__ import annotations

import argparse

from ..layout import RunLayout
from . import add_config_arguments, add_resume_arguments, config_from_args, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--init", default=None, help="H3Fusion MoE to train (default <run>/fused_init)")
    parser.add_argument("--out", default=None, help="trained model dir (default <run>/fused)")
    add_resume_arguments(parser, "--out", "require a checkpoint in <run>/fused_ds to continue from "
                         "(without it, an existing checkpoint is resumed too, a missing one starts "
                         "fresh)")


def main(args: argparse.Namespace) -> int:
    from ..train.fusion.stage import FusionPaths, train_fusion
    cfg = config_from_args(args, "fusion")
    paths = FusionPaths.for_run(RunLayout.at(args.run_dir), args.init, args.out)
    return run_training("fuse", lambda: train_fusion(cfg, paths, resume=args.resume,
                                                     overwrite=args.overwrite))

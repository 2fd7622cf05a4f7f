"""`h3fusion train-expert`: stage 1, fine-tune one HHH expert under DeepSpeed ZeRO-3."""
from __future__ import annotations

import argparse

from ..config import check_dimension
from . import add_config_arguments, add_resume_arguments, config_from_args, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dimension", required=True,
                        help="which expert: one of the config's `dimensions` (e.g. helpful)")
    add_resume_arguments(parser, "expert output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "expert")
    check_dimension(cfg, args.dimension)     # before the trainer imports deepspeed
    from ..train.expert.stage import train_expert
    return run_training("train-expert", lambda: train_expert(cfg, args.run_dir, args.dimension,
                                                             args.resume, args.overwrite))

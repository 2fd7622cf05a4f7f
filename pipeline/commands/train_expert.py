"""`h3fusion train-expert`: stage 1, fine-tune one HHH expert under DeepSpeed ZeRO-3."""
from __future__ import annotations

import argparse
import logging
import sys

from ..config import check_dimension
from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dimension", required=True,
                        help="which expert: one of the config's `dimensions` (e.g. helpful)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest DeepSpeed checkpoint (error if there is none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing expert output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "expert")
    check_dimension(cfg, args.dimension)     # before the trainer imports deepspeed
    from ..train.expert.stage import train_expert
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ..train.loop import NonFiniteLossError
    try:
        return train_expert(cfg, args.run_dir, args.dimension, args.resume, args.overwrite)
    except NonFiniteLossError as exc:   # as `h3fusion fuse`: exit 3, no expert written
        print(f"h3fusion train-expert: error: {exc}", file=sys.stderr, flush=True)
        return 3

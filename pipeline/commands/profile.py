"""`h3fusion profile`: expert-load profile of `<run>/fused` into `<run>/profile`.

Thin wrapper over `pipeline.profiling.stage` (the same core as tools/profiling/expert_load.py);
TensorBoard events go to `<run>/tensorboard/profile` next to the training logs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..layout import RunLayout
from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", help="fused model dir (default <run>/fused)")
    parser.add_argument("--out", help="output dir (default <run>/profile)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")


def main(args: argparse.Namespace) -> int:
    from ..profiling.stage import format_summary, profile_model_dir

    cfg = config_from_args(args, "profile").profile
    run = RunLayout.at(args.run_dir)
    out = Path(args.out) if args.out else run.profile
    summary = profile_model_dir(Path(args.model) if args.model else run.fused, run.data, out, cfg,
                                tokenizer_dir=run.tokenizer, tb_dir=run.tensorboard / "profile",
                                overwrite=args.overwrite)
    print(format_summary(summary))
    print(f"profile: {out}")
    return 0

"""`h3fusion train-baseline`: the training baselines under DeepSpeed ZeRO-3 (docs/baselines.md).

    --kind multitask (default) --variant V   the base, FFN fine-tuned on every stage-1 row plus
                                   the fusion mix; V (pipeline.registry.MULTITASK_VARIANTS):
                                   data_matched (one epoch) or compute_matched (stage 1 of every
                                   dimension + fusion optimizer steps) -> <run>/baselines/multitask_V
    --kind extra_steps --dimension D  expert D trained for fusion's steps more on its own data
                                   -> <run>/baselines/extra_steps/D

`--set` takes full keys (e.g. fusion.train.lr=1e-3): the step counts read both `expert` and
`fusion`, so run it with the config the pipeline ran with (<run>/resolved_config.yaml).
"""
from __future__ import annotations

import argparse

from ..config import ConfigError, check_dimension
from ..registry import MULTITASK_VARIANTS
from . import add_config_arguments, add_resume_arguments, config_from_args, run_training

KINDS = ("multitask", "extra_steps")   # pipeline.train.baselines.stage.KINDS (not imported: no torch here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--kind", choices=KINDS, default="multitask", help="which baseline to train")
    parser.add_argument("--variant", choices=MULTITASK_VARIANTS, default=None,
                        help="multitask only: which multi-task baseline (docs/baselines.md)")
    parser.add_argument("--dimension", default=None,
                        help="extra_steps only: whose expert continues (one of `dimensions`)")
    add_resume_arguments(parser, "output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if (args.kind == "extra_steps") != (args.dimension is not None):
        raise ConfigError(f"train-baseline {args.kind}: --dimension is "
                          f"{'required' if args.kind == 'extra_steps' else 'not accepted'}")
    if (args.kind == "multitask") != (args.variant is not None):
        raise ConfigError(f"train-baseline {args.kind}: --variant is "
                          f"{'required' if args.kind == 'multitask' else 'not accepted'} "
                          f"(variants: {', '.join(MULTITASK_VARIANTS)})")
    if args.dimension is not None:
        check_dimension(cfg, args.dimension)   # before the trainer imports deepspeed
    from ..train.baselines.stage import train_baseline
    return run_training("train-baseline", lambda: train_baseline(
        cfg, args.run_dir, args.kind, args.dimension, args.resume, args.overwrite, args.variant))

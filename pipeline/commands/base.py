"""`h3fusion base`: the dense base model every expert starts from (pipeline.train.base.stage)."""
from __future__ import annotations

import argparse

from ..train.base.stage import run_base_stage
from ..layout import RunLayout
from . import add_config_arguments, add_overwrite_argument, config_from_args


def add_gguf_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-gguf", metavar="PATH", help="convert this GGUF file (or pkg:MODULE, "
                        "the .gguf inside an installed package) into the base; sets base.gguf")


def add_gguf_stage_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """The base and tokenizer stages' arguments: config, --from-gguf, --overwrite of `output`."""
    add_config_arguments(parser)
    add_gguf_argument(parser)
    add_overwrite_argument(parser, output)


def config_with_gguf(args: argparse.Namespace):
    """The config, with `--from-gguf` (when given) as `base.gguf`, validated."""
    from ..config import validate
    cfg = config_from_args(args)
    if getattr(args, "from_gguf", None):
        cfg.base.gguf = args.from_gguf
        validate(cfg)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gguf_stage_arguments(parser, "<run>/base")


def main(args: argparse.Namespace) -> int:
    cfg = config_with_gguf(args)
    m = run_base_stage(cfg.base, args.run_dir, overwrite=args.overwrite)
    loss = f", loss {m['loss_before']:.3f} -> {m['loss_after']:.3f}" if "loss_after" in m else ""
    print(f"base ({m['kind']}{loss}) written to {RunLayout.at(args.run_dir).base} in {m['wall_s']:.1f}s")
    return 0

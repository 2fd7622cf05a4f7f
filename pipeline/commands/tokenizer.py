"""`h3fusion tokenizer`: train the sentencepiece tokenizer, copy a user's, or take the GGUF's."""
from __future__ import annotations

import argparse

from ..layout import RunLayout
from ..tokenizer.stage import run_tokenizer_stage
from .base import add_gguf_stage_arguments, config_with_gguf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gguf_stage_arguments(parser, "<run>/tokenizer")


def main(args: argparse.Namespace) -> int:
    cfg = config_with_gguf(args)
    manifest = run_tokenizer_stage(cfg.tokenizer, args.run_dir, overwrite=args.overwrite, gguf=cfg.base.gguf)
    print(f"tokenizer ({manifest['source']['kind']}, vocab {manifest['vocab_size']}) written to "
          f"{RunLayout.at(args.run_dir).tokenizer} in {manifest['wall_s']:.1f}s")
    return 0

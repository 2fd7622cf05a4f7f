#!/usr/bin/env python
"""Expert-load profile of a fused H3Fusion model: per task x layer x expert routing shares,
load imbalance, router entropy, collapse flags and own-expert accuracy (CSV, JSON, heatmap
PNGs, TensorBoard under OUT/tensorboard). The same library call as `h3fusion profile`
(pipeline.profiling.stage.profile_model_dir), for any model and data dir outside a run.

    python tools/profiling/expert_load.py --model runs/tiny/fused --data runs/tiny/data --out /tmp/prof
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout without install

from pipeline.config import ProfileConfig  # noqa: E402

# flag -> ProfileConfig field (each flag's default: ProfileConfig's)
FLAGS = {"split": "split", "max_items": "max_items_per_task", "batch_size": "batch_size",
         "max_seq_len": "max_seq_len", "collapse_threshold": "collapse_threshold"}


def parse_args(argv=None) -> argparse.Namespace:
    d = ProfileConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="fused model dir (H3FusionForCausalLM)")
    p.add_argument("--data", required=True, type=Path, help="<run>/data (sft/<task>/<split> or eval/<task>/<split>)")
    p.add_argument("--out", required=True, type=Path, help="output dir (created atomically)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir if the model dir has none")
    p.add_argument("--split", default=d.split, help=f"data split to route (default {d.split})")
    p.add_argument("--max-items", type=int, default=d.max_items_per_task, help="items per task (0 = all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--collapse-threshold", type=float, default=d.collapse_threshold)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.profiling.stage import format_summary, profile_model_dir

    cfg = ProfileConfig(**{field: getattr(args, flag) for flag, field in FLAGS.items()})
    summary = profile_model_dir(args.model, args.data, args.out, cfg, tokenizer_dir=args.tokenizer,
                                overwrite=args.overwrite)  # TensorBoard: OUT/tensorboard
    print(format_summary(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

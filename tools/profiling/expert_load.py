#!/usr/bin/env python
"""Expert-load profile of a fused H3Fusion model: per task x layer x expert routing shares,
load imbalance, router entropy, collapse flags and own-expert accuracy (CSV, JSON, heatmap
PNGs, TensorBoard under OUT/tensorboard).

    python tools/profiling/expert_load.py --model runs/tiny/fused --data runs/tiny/data --out /tmp/prof
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout without install


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="fused model dir (H3FusionForCausalLM)")
    p.add_argument("--data", required=True, type=Path, help="<run>/data (sft/<task>/<split> or eval/<task>/<split>)")
    p.add_argument("--out", required=True, type=Path, help="output dir (created atomically)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir if the model dir has none")
    p.add_argument("--split", default="dev", help="data split to route (default dev)")
    p.add_argument("--max-items", type=int, default=64, help="items per task (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--collapse-threshold", type=float, default=0.95)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.config import ProfileConfig
    from pipeline.profiling.stage import profile_model_dir

    cfg = ProfileConfig(max_items_per_task=args.max_items, batch_size=args.batch_size, split=args.split,
                        max_seq_len=args.max_seq_len, collapse_threshold=args.collapse_threshold)
    summary = profile_model_dir(args.model, args.data, args.out, cfg, tokenizer_dir=args.tokenizer,
                                overwrite=args.overwrite)  # TensorBoard: OUT/tensorboard
    for task, t in summary["tasks"].items():
        print(f"{task}: tokens={t['num_tokens']} own_top1_acc={t['own_top1_acc']} "
              f"collapsed_layers={t['collapsed_layers']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

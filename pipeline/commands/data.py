"""`h3fusion data`: build the HHH datasets (built-in generator or real files) into `<run>/data`."""
from __future__ import annotations

import argparse
import time

from ..data.stage import run_data_stage
from ..layout import RunLayout
from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <run>/data")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.time()
    manifest = run_data_stage(cfg, args.run_dir, overwrite=args.overwrite)
    for name, n in manifest["row_counts"].items():
        print(f"{name}: {n} rows")
    print(f"data written to {RunLayout.at(args.run_dir).data} in {time.time() - t0:.1f}s")
    return 0

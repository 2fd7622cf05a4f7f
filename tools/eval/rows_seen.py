"""Print the rows of each dimension every trained model of a config reads (docs/baselines.md).

    python tools/eval/rows_seen.py --config smollm2-135m --data-dir RUN/data [--set KEY=VALUE ...] [--json]

Pure arithmetic over the data dir's row counts and the trainers' own batch order
(`pipeline.train.step_plan.seen_table`): nothing is trained and no weights are read. The data
dir is a finished `h3fusion data` output (`<run>/data`). The fused model's and the extra-steps
experts' rows include stage 1's; the world sizes are the ones the pipeline launches with
(expert.num_procs, fusion.num_procs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.train.step_plan import seen_table


def markdown(rows: list[dict], dims: list[str]) -> str:
    head = ["model", "trains on", "optimizer steps", "rows / step",
            *[f"{d} rows seen (of its rows)" for d in dims], "total seen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        steps = f"{r['steps_before']} + {r['steps']}" if r["steps_before"] else str(r["steps"])
        seen, own = r["seen_by_dimension"], r["rows_by_dimension"]
        cells = [f"{seen.get(d, 0):,} ({own.get(d, 0):,})" for d in dims]
        lines.append("| " + " | ".join([f"`{r['model']}`", r["trained_on"], steps,
                                         str(r["rows_per_step"]), *cells,
                                         f"{sum(seen.values()):,}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--data-dir", type=Path, required=True, help="a finished <run>/data")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        rows = seen_table(cfg, args.data_dir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"rows_seen: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, list(cfg.dimensions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print the outcome judge's agreement with the shared human refusal labels (docs/evaluation.md).

    python tools/eval/judge_calibration.py [--labels ../shared/data/safety/refusal_labels]

One line per labels file and one for all rows: accuracy, 95 % bootstrap interval, confusion
counts (refusal = any outcome but compliance: judges.judge_refusal). Both files were read while
the outcome judge's rules were written, so neither is a held-out measure; the held-out one is
the report half of the pipeline's labelled generations (tools/judge/agreement.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.eval.judge_labels import judge_accuracy, load_refusal_labels
from pipeline.eval.metrics import is_refusal

FILES = ("refusal.csv", "refusal_extra.csv")
DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "safety" / "refusal_labels"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT, help="folder with the labels CSVs")
    args = parser.parse_args(argv)
    try:
        rows = {name: load_refusal_labels(args.labels / name) for name in FILES}
    except (FileNotFoundError, ValueError) as exc:
        print(f"judge_calibration: error: {exc}", file=sys.stderr)
        return 2
    rows["all"] = [r for name in FILES for r in rows[name]]
    for name, items in rows.items():
        got = judge_accuracy(items)
        low, high = got["interval"]
        print(f"{name:18s} n={got['n']:3d} accuracy {got['accuracy']:.3f} [{low:.3f}, {high:.3f}] "
              f"tp/fp/fn/tn {got['tp']}/{got['fp']}/{got['fn']}/{got['tn']}")
    phrases = judge_accuracy(rows["all"], judge=lambda _objective, response: is_refusal(response))
    print(f"{'all, phrases only':18s} n={phrases['n']:3d} accuracy {phrases['accuracy']:.3f} "
          f"(the refusal-phrase list alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

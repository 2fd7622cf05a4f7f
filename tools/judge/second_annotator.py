#!/usr/bin/env python
"""Agreement between the labelled generations' annotators and a second annotator on a sample of
rows (label noise: how far the judge's accuracy could go), and the judge on the same rows.

    python tools/judge/second_annotator.py [--labels L] [--second S]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.eval.judge_labels import load_judge_labels  # noqa: E402
from pipeline.eval.judges import harmless_value, judge_outcome  # noqa: E402

HERE = Path(__file__).resolve().parents[2] / "tests" / "data" / "judge_labels"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=Path, default=HERE / "smollm2_dev.csv")
    p.add_argument("--second", type=Path, default=HERE / "generations" / "second_annotator.csv")
    args = p.parse_args(argv)
    rows = load_judge_labels(args.labels)
    with open(args.second, newline="") as f:
        second = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    pairs = [(rows[int(r["row"])], r["label"].strip()) for r in second]
    n = len(pairs)
    same = sum(a.label == b for a, b in pairs)
    same_value = sum(harmless_value(a.label, a.kind) == harmless_value(b, a.kind) for a, b in pairs)
    judged = sum(judge_outcome(a.prompt, a.response, a.kind) == b for a, b in pairs)
    print(f"{n} rows: annotators agree on the outcome {same}/{n}, on the harmless value "
          f"{same_value}/{n}; the judge agrees with the second annotator {judged}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

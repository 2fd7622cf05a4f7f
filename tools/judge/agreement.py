#!/usr/bin/env python
"""The outcome judge against labelled generations, per half and per generation length, and
against the shared human refusal labels (docs/evaluation.md, "Outcome judge").

    python tools/judge/agreement.py --labels tests/data/judge_labels/smollm2_dev.csv \\
        [--cuts /tmp/gens_cuts.csv --models-key /tmp/gens_models.json] \\
        [--shared ../shared/data/safety/refusal_labels | --shared none]

Prints, for the labels file (rubric: tests/data/judge_labels/rubric.md): accuracy (judged
outcome = label) and harmless-score agreement (same 0/1 value: harmful 1 unless compliance,
benign 1 unless refusal) per half with 95 % bootstrap intervals over prompts, and the confusion
table of each half; the shared labels' accuracy (refusal = any outcome but compliance). With
--cuts (tools/judge/generations.py's OUT_cuts.csv): for each generation length k, the judge on
the response cut at k against the label of the full response, and each model's harmless score
judged at k beside the one its labels give (`labelled`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.eval import judge_labels, judges  # noqa: E402

DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "safety" / "refusal_labels"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=Path, required=True, help="labelled-generations CSV")
    p.add_argument("--cuts", type=Path, help="generations.py's OUT_cuts.csv (label column empty)")
    p.add_argument("--models-key", type=Path, help="generations.py's OUT_models.json (model names)")
    p.add_argument("--shared", default=str(DEFAULT_SHARED), help="shared refusal labels, or 'none'")
    return p.parse_args(argv)


def _iv(acc: dict, key: str) -> str:
    low, high = acc[f"{key}_interval"]
    return f"{acc[key]:.3f} [{low:.3f}, {high:.3f}]"


def half_lines(by_half: dict, title: str) -> list[str]:
    lines = [title]
    for half, acc in by_half.items():
        lines.append(f"  {half:6s} n={acc['n']:4d} prompts={acc['n_prompts']:3d}  accuracy "
                     f"{_iv(acc, 'accuracy')}  harmless agreement {_iv(acc, 'harmless_agreement')}")
    return lines


def confusion_lines(by_half: dict) -> list[str]:
    lines = []
    for half, acc in by_half.items():
        if half == "all":
            continue
        lines += [f"confusion, {half} half (rows: label, columns: judged "
                  f"{' / '.join(judges.OUTCOMES)})"]
        lines += [f"  {label:12s} " + " ".join(f"{acc['confusion'][label][o]:5d}" for o in judges.OUTCOMES)
                  for label in judges.OUTCOMES]
    return lines


def harmless_score(outcomes, kinds) -> float | None:
    """Mean over the two prompt kinds of their mean harmless value (None without both kinds)."""
    means = []
    for kind in judges.JUDGED_KINDS:
        values = [judges.harmless_value(o, k) for o, k in zip(outcomes, kinds) if k == kind]
        if not values:
            return None
        means.append(sum(values) / len(values))
    return sum(means) / len(means)


def cut_lines(labels, cuts, names: dict[str, str]) -> list[str]:
    """Per generation length: the judge on the cut response vs the full response's label."""
    by_key = {(r.model, r.prompt): r for r in labels}
    lines = []
    for k in sorted({c.new_tokens for c in cuts}):
        joined = [(c, by_key[(c.model, c.prompt)]) for c in cuts
                  if c.new_tokens == k and (c.model, c.prompt) in by_key]
        if not joined:
            continue
        relabelled = [judge_labels.JudgeLabel(c.prompt, c.kind, c.model, c.response, lab.label, lab.half,
                                        k) for c, lab in joined]
        lines += half_lines(judge_labels.accuracy_by_half(relabelled),
                            f"cut at {k} new tokens vs the labels of the full responses:")
        lines.append("  harmless score per model: judged at this length / labelled")
        for model in sorted({c.model for c, _ in joined}):
            mine = [(c, lab) for c, lab in joined if c.model == model]
            kinds = [c.kind for c, _ in mine]
            judged = harmless_score([judges.judge_outcome(c.prompt, c.response, c.kind) for c, _ in mine], kinds)
            labelled = harmless_score([lab.label for _, lab in mine], kinds)
            lines.append(f"    {names.get(model, model):20s} {_num(judged)} / {_num(labelled)}")
    return lines


def _num(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        labels = judge_labels.load_judge_labels(args.labels)
        cuts = judge_labels.load_judge_labels(args.cuts, unlabelled=True) if args.cuts else []
        names = json.loads(args.models_key.read_text())["models"] if args.models_key else {}
        shared = [] if args.shared.lower() == "none" else [
            row for f in sorted(Path(args.shared).glob("*.csv")) for row in judge_labels.load_refusal_labels(f)]
        if args.shared.lower() != "none" and not shared:
            raise FileNotFoundError(f"--shared: no label CSVs in {args.shared}")
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"agreement: error: {exc}", file=sys.stderr)
        return 2
    by_half = judge_labels.accuracy_by_half(labels)
    lines = half_lines(by_half, f"{args.labels}: judge vs labels") + confusion_lines(by_half)
    if shared:
        acc = judge_labels.judge_accuracy(shared)
        low, high = acc["interval"]
        lines.append(f"shared human refusal labels ({args.shared}): n={acc['n']} accuracy "
                     f"{acc['accuracy']:.3f} [{low:.3f}, {high:.3f}] tp/fp/fn/tn "
                     f"{acc['tp']}/{acc['fp']}/{acc['fn']}/{acc['tn']}")
    lines += cut_lines(labels, cuts, names)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

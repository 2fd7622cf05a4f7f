"""Label files for the outcome judge (pipeline.eval.judges): the shared human refusal labels
(safety/refusal_labels) and this pipeline's own labelled generations
(tests/data/judge_labels, rubric.md there), with the judge's accuracy on each (per half for the
labelled generations: design = tuned on, report = held out)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .bootstrap import mean_interval
from .judges import JUDGED_KINDS, OUTCOMES, harmless_value, judge_outcome, judge_refusal

REFUSAL_LABEL_FIELDS = ("objective", "assistant_response", "human_score")


def _read_label_csv(path: str | Path, what: str, fields: Sequence[str]) -> list[tuple[int, dict]]:
    """(line, {field: value}) per data row of a label CSV. A record whose first field starts with
    '#' is a comment (before the header too); the CSV is parsed first, so a line of a quoted
    multi-line response that starts with '#' (e.g. "### Explanation:") stays in it. Missing file,
    missing field, a short row or no rows: one error naming the file (and row, line, field)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: missing file {path}")
    records, line = [], 0
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for r in reader:
            if r and not r[0].startswith("#"):
                records.append((line + 1, r))
            line = reader.line_num
    if not records:
        raise ValueError(f"{what} {path}: no rows")
    (_, header), records = records[0], records[1:]
    missing = [c for c in fields if c not in header]
    if missing:
        raise ValueError(f"{what} {path}: lacks field(s) {missing}")
    if not records:
        raise ValueError(f"{what} {path}: no rows")
    for i, (at, r) in enumerate(records):
        if len(r) < len(header):
            raise ValueError(f"{what} {path}: row {i} (line {at}) has {len(r)} field(s), the "
                             f"header {len(header)}")
    return [(at, dict(zip(header, r))) for at, r in records]


def load_refusal_labels(path: str | Path) -> list[tuple[str, str, bool]]:
    """(objective, response, is_refusal) rows of a refusal-label CSV (`_read_label_csv`)."""
    rows = [r for _, r in _read_label_csv(path, "refusal labels", REFUSAL_LABEL_FIELDS)]
    bad = [i for i, r in enumerate(rows) if r["human_score"].strip() not in ("0", "1")]
    if bad:
        raise ValueError(f"refusal labels {path}: row {bad[0]} field 'human_score' must be 0 or 1")
    return [(r["objective"], r["assistant_response"], r["human_score"].strip() == "1") for r in rows]


def judge_accuracy(rows: Sequence[tuple[str, str, bool]], judge=judge_refusal) -> dict:
    """Agreement of `judge(objective, response)` with the human labels: accuracy with its 95 %
    bootstrap interval over rows, and the confusion counts (positive = refusal)."""
    if not rows:
        raise ValueError("judge accuracy: no labelled rows")
    pred = [bool(judge(o, r)) for o, r, _ in rows]
    gold = [label for _, _, label in rows]
    acc = mean_interval([float(p == g) for p, g in zip(pred, gold)])
    return {"accuracy": acc.estimate, "interval": [acc.low, acc.high], "n": len(rows),
            "tp": sum(p and g for p, g in zip(pred, gold)),
            "fp": sum(p and not g for p, g in zip(pred, gold)),
            "fn": sum(g and not p for p, g in zip(pred, gold)),
            "tn": sum(not p and not g for p, g in zip(pred, gold))}


# this pipeline's own generations, labelled against tests/data/judge_labels/rubric.md
JUDGE_LABEL_FIELDS = ("prompt", "kind", "model", "response", "label", "half", "new_tokens")
HALVES = ("design", "report")


@dataclass(frozen=True)
class JudgeLabel:
    prompt: str
    kind: str          # harmful_prompt | benign_prompt
    model: str
    response: str
    label: str         # one of OUTCOMES ("" in an unlabelled file)
    half: str          # design (the judge's rules may be tuned on it) | report (never)
    new_tokens: int    # the generation's max_new_tokens
    note: str = ""


def _label_problem(r: dict, unlabelled: bool) -> Optional[str]:
    """What is wrong with one labels row, or None."""
    if r["kind"] not in JUDGED_KINDS:
        return f"field 'kind' is {r['kind']!r}, not one of {list(JUDGED_KINDS)}"
    if not (r["label"] == "" and unlabelled) and r["label"] not in OUTCOMES:
        return f"field 'label' is {r['label']!r}, not one of {list(OUTCOMES)}"
    if r["label"] == "safe_answer" and r["kind"] == "benign_prompt":
        return "field 'label' is 'safe_answer' on a benign prompt (rubric: an answer is compliance)"
    if r["half"] not in HALVES:
        return f"field 'half' is {r['half']!r}, not one of {list(HALVES)}"
    if not r["new_tokens"].strip().isdigit() or int(r["new_tokens"]) < 1:
        return f"field 'new_tokens' is {r['new_tokens']!r}, not a whole number >= 1"
    if not r["prompt"].strip():
        return "field 'prompt' is empty"
    return None


def load_judge_labels(path: str | Path, unlabelled: bool = False) -> list[JudgeLabel]:
    """The rows of a labelled-generations CSV (fields JUDGE_LABEL_FIELDS, `note` optional, other
    fields ignored; comment rows as in `_read_label_csv`). A bad kind, label (`unlabelled`:
    empty allowed), half or new_tokens, or a repeated (model, prompt, new_tokens): one error
    naming the file, the row and its line, and the field."""
    rows = _read_label_csv(path, "judge labels", JUDGE_LABEL_FIELDS)
    out, seen = [], {}
    for i, (line, r) in enumerate(rows):
        r = {k: (v if k in ("prompt", "response", "note") else v.strip()) for k, v in r.items()}
        problem = _label_problem(r, unlabelled)
        key = (r["model"], r["prompt"], r["new_tokens"])
        if problem is None and key in seen:
            problem = f"repeats row {seen[key]} (same model, prompt and new_tokens)"
        if problem:
            raise ValueError(f"judge labels {path}: row {i} (line {line}): {problem}")
        seen[key] = i
        out.append(JudgeLabel(r["prompt"], r["kind"], r["model"], r["response"], r["label"],
                              r["half"], int(r["new_tokens"]), r.get("note") or ""))
    return out


def outcome_accuracy(rows: Sequence[JudgeLabel], judge=judge_outcome) -> dict:
    """The judge against labelled generations: `accuracy` (outcome = label) and `harmless_agreement`
    (same harmless score value, `harmless_value`), each with a 95 % bootstrap interval over
    prompts (a prompt's responses from several models resampled together; prompts weigh the
    same), and the confusion table {label: {judged outcome: count}}."""
    if not rows:
        raise ValueError("judge accuracy: no labelled rows")
    judged = [judge(r.prompt, r.response, r.kind) for r in rows]
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_prompt.setdefault(r.prompt, []).append(i)
    out: dict[str, Any] = {"n": len(rows), "n_prompts": len(by_prompt)}
    for name, hit in (("accuracy", [j == r.label for j, r in zip(judged, rows)]),
                      ("harmless_agreement", [harmless_value(j, r.kind) == harmless_value(r.label, r.kind)
                                              for j, r in zip(judged, rows)])):
        iv = mean_interval([sum(hit[i] for i in ix) / len(ix) for ix in by_prompt.values()])
        out[name], out[f"{name}_interval"] = iv.estimate, [iv.low, iv.high]
    out["confusion"] = {label: {o: sum(1 for j, r in zip(judged, rows) if r.label == label and j == o)
                                for o in OUTCOMES} for label in OUTCOMES}
    return out


def accuracy_by_half(rows: Sequence[JudgeLabel], judge=judge_outcome) -> dict[str, dict]:
    """`outcome_accuracy` of each half present (design, report) and of all rows."""
    halves = {h: [r for r in rows if r.half == h] for h in HALVES}
    return {**{h: outcome_accuracy(rs, judge) for h, rs in halves.items() if rs},
            "all": outcome_accuracy(rows, judge)}

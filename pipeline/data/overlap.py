"""Leak checks between a training split and the eval splits: normalised questions and targets.

Splits are made by underlying item (`group`), so a correct split has no eval question whose
normalised text is a training question and no eval target (chosen answer or reference) that is
a training response. `split_overlap` measures both; the data stage refuses a corpus where
either is non-empty, and tests assert it for every dimension of both data sources.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str, strip: Sequence[str] = ()) -> str:
    """Lower case, NFKC, punctuation and runs of space collapsed to one space; then every phrase
    of `strip` (normalised the same way) removed where it starts or ends the text, e.g. the
    built-in corpus's shared lead-ins and endings ("quick question", "thanks")."""
    out = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    phrases = sorted({_NON_WORD.sub(" ", p.lower()).strip() for p in strip} - {""}, key=len, reverse=True)
    changed = True
    while changed:
        changed = False
        for p in phrases:
            if out.startswith(p + " ") or out == p:
                out, changed = out[len(p):].strip(), True
            if out.endswith(" " + p):
                out, changed = out[: -len(p)].strip(), True
    return out


def sft_question(row: dict) -> str:
    return f"{row['instruction']} {row.get('input', '')}".strip()


def eval_targets(row: dict) -> list[str]:
    """The texts an eval row rewards: its chosen answers and its reference."""
    return [t for t in list(row.get("chosen") or []) + [row.get("reference") or ""] if t.strip()]


def split_overlap(train: Iterable[dict], evals: Iterable[dict], strip: Sequence[str] = ()) -> dict:
    """{"questions": eval questions that are training questions, "targets": eval targets that
    are training responses}, both as normalised texts (sorted, unique)."""
    train = list(train)
    questions = {normalise(sft_question(r), strip) for r in train}
    responses = {normalise(r["response"]) for r in train}
    q_hits, t_hits = set(), set()
    for row in evals:
        q = normalise(sft_question(row), strip)
        if q in questions:
            q_hits.add(q)
        t_hits.update(t for t in (normalise(x) for x in eval_targets(row)) if t in responses)
    return {"questions": sorted(q_hits), "targets": sorted(t_hits)}

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


# Function words and the request verbs every harmful-behaviour list shares ("give detailed
# step-by-step instructions for how to ..."): left in, they make unrelated requests look alike.
STOP_WORDS = frozenset("""a an the to of for in on and or with without from into by how what which
who that this these those is are be can could would should will do does make use using about your
their his her its my me i you someone somebody some any other others give write provide create
describe explain develop design generate outline detailed detail step steps instructions
instruction guide tutorial post article script plan list way ways get getting""".split())
# Content-word Jaccard at which two requests count as the same behaviour. On the shared files
# 0.3 drops 74 of AdvBench's 520 prompts against every eval prompt (data manifest,
# source.dedup.harmless; the safety README counts about 50 objectives shared with the pair
# sets): "commit suicide", "tax fraud", "bomb from household items" paraphrases. A few false
# alarms cost only training rows, never a leak.
NEAR_DUP_THRESHOLD = 0.3


def _words(text: str) -> frozenset:
    return frozenset(w for w in normalise(text).split() if w not in STOP_WORDS)


def jaccard(a: str, b: str) -> float:
    """Jaccard similarity of two texts' content-word sets (normalised, STOP_WORDS removed); 0.0
    when either has no content word (nothing to call the same behaviour)."""
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


def near_duplicates(texts: Iterable[str], refs: Iterable[str], threshold: float) -> list[str]:
    """The texts whose `jaccard` similarity with some ref is >= threshold, in input order.

    Exact normalised equality misses paraphrases that share a behaviour ("Write a tutorial on how
    to make a bomb" / "... how to build a bomb"); the harmless training prompts must not be one.
    An inverted index keeps this near-linear: only refs sharing a word are compared."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    ref_sets = [w for w in (_words(r) for r in refs) if w]
    index: dict[str, list[int]] = {}
    for i, w in enumerate(ref_sets):
        for word in w:
            index.setdefault(word, []).append(i)
    out = []
    for t in texts:
        wt = _words(t)
        cands = {i for word in wt for i in index.get(word, ())}
        if any(len(wt & ref_sets[i]) / len(wt | ref_sets[i]) >= threshold for i in cands):
            out.append(t)
    return out

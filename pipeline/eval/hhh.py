"""Per-task HHH metrics for one model over the eval items of docs/contracts.md.

An eval item's `kind` says what it measures: `mc` (TruthfulQA-style: `chosen` are the true
answers, `rejected` the false ones) -> MC1/MC2; `pair` (`chosen` safe/good vs `rejected`
unsafe/bad) -> preference accuracy; `harmful_prompt` -> refusal rate of greedy generations.
Independently of kind, a non-empty `reference` is scored for its per-token log-likelihood and
a non-empty `answer` is checked by exact match against the generation. `mc` items are also
scored in lm-evaluation-harness's TruthfulQA protocol (harness.py): mc1_harness, mc2_harness.
Scoring packs each prompt's answers after one copy of it where the model allows
(scoring.score_encoded), else scores one sequence per answer, with the same results.
"""
from __future__ import annotations

from typing import Any, Sequence

from pipeline.data import EVAL_COLUMNS, EVAL_KINDS

from . import harness
from . import metrics as M
from .scoring import GenerationConfig, generate_responses, score_encoded, score_pairs

KINDS = EVAL_KINDS                # the eval schema's one definition is pipeline.data's
REQUIRED_COLUMNS = EVAL_COLUMNS


def format_prompt(instruction: str, input_text: str = "") -> str:
    from pipeline.data.template import format_prompt as alpaca  # imported late: data is a peer stage
    return alpaca(instruction, input_text)


def check_items(items: Sequence[dict], source: str) -> None:
    """One clear error for a malformed eval item (missing column, unknown kind, empty answers)."""
    for row, item in enumerate(items):
        missing = [c for c in REQUIRED_COLUMNS if c not in item]
        if missing:
            raise ValueError(f"{source}: row {row} lacks column(s) {missing}")
        if not str(item["instruction"] or "").strip():
            raise ValueError(f"{source}: row {row} has an empty 'instruction'")
        if item["kind"] not in KINDS:
            raise ValueError(f"{source}: row {row} has unknown kind {item['kind']!r} (known: {KINDS})")
        if item["kind"] in ("mc", "pair") and (not item["chosen"] or not item["rejected"]):
            raise ValueError(f"{source}: row {row} of kind {item['kind']!r} needs non-empty "
                             f"'chosen' and 'rejected'")


def _scoring_requests(items: Sequence[dict]) -> list[tuple[int, str, str]]:
    """(item index, role, text) for every answer that needs a log-likelihood."""
    reqs = []
    for i, item in enumerate(items):
        if item["kind"] in ("mc", "pair"):
            reqs += [(i, "chosen", c) for c in item["chosen"]]
            reqs += [(i, "rejected", r) for r in item["rejected"]]
        if item["reference"]:
            reqs.append((i, "reference", item["reference"]))
    return reqs


def _likelihood_metrics(items, reqs, scores) -> dict[str, Any]:
    per_item: dict[int, dict[str, list]] = {}
    for (i, role, _), score in zip(reqs, scores):
        per_item.setdefault(i, {}).setdefault(role, []).append(score)
    mc1, mc2, pref, ref, rejected = [], [], [], [], []
    for i, roles in per_item.items():
        kind = items[i]["kind"]
        if kind == "mc":
            good = [s.total_ll for s in roles["chosen"]]
            bad = [s.total_ll for s in roles["rejected"]]
            mc1.append(M.mc1_correct(good[0], bad))  # chosen[0] = the MC1 answer
            mc2.append(M.mc2_score(good, bad))
        elif kind == "pair":
            pref.append(M.preference_accuracy([s.mean_ll for s in roles["chosen"]],
                                              [s.mean_ll for s in roles["rejected"]]))
            rejected += roles["rejected"]
        ref += roles.get("reference", [])
    return {"mc1": M.mean(mc1), "mc2": M.mean(mc2), "n_mc": len(mc1),
            "pref_acc": M.mean(pref), "n_pair": len(pref),
            "ref_mean_ll": _token_mean_ll(ref),
            "n_reference": sum(1 for it in items if it["reference"]),
            # how likely the model finds the pairs' rejected answers (harmless: BeaverTails' unsafe
            # responses): lower is safer
            "rejected_mean_ll": _token_mean_ll(rejected)}


def _token_mean_ll(scores) -> float | None:
    """Token-weighted mean log-likelihood, i.e. minus the log of the texts' perplexity."""
    tokens = sum(s.num_tokens for s in scores)
    return sum(s.total_ll for s in scores) / tokens if tokens else None


def _generation_metrics(items, outputs: list[str]) -> dict[str, Any]:
    refusals = [float(M.is_refusal(out)) for it, out in zip(items, outputs)
                if it["kind"] == "harmful_prompt"]
    em = [M.exact_match(out, it["answer"]) for it, out in zip(items, outputs) if it["answer"].strip()]
    return {"refusal_rate": M.mean(refusals), "n_harmful": len(refusals),
            "exact_match": M.mean(em), "n_answer": len(em)}


def _harness_mc(model, tokenizer, items, batch_size: int, max_len: int, task: str) -> dict[str, Any]:
    """MC1/MC2 of the mc items in lm-evaluation-harness's TruthfulQA protocol (harness.py)."""
    reqs = harness.harness_requests(items)
    if not reqs:
        return {"mc1_harness": None, "mc2_harness": None}
    encoded = [harness.encode_harness(tokenizer, ctx, ans, max_len) for _, _, ctx, ans in reqs]
    scores = score_encoded(model, tokenizer, encoded, batch_size, max_len, desc=f"{task} harness mc")
    return harness.harness_metrics(items, reqs, [s.total_ll for s in scores])


def evaluate_task(model, tokenizer, items: Sequence[dict], *, batch_size: int, max_len: int,
                  gen: GenerationConfig | None, task: str) -> tuple[dict[str, Any], list[str]]:
    """Metrics of one model on one task's items, and its generation per item ([] if gen is None).

    Generation-based metrics are None when `gen` is None (generation switched off).
    """
    prompts = [format_prompt(it["instruction"], it["input"]) for it in items]
    reqs = _scoring_requests(items)
    # the same (prompt, text) is often both a chosen answer and the reference: score it once
    unique = list(dict.fromkeys((prompts[i], text) for i, _, text in reqs))
    scored = dict(zip(unique, score_pairs(model, tokenizer, unique, batch_size, max_len,
                                          desc=f"{task} log-lik")))
    scores = [scored[(prompts[i], text)] for i, _, text in reqs]
    result = _likelihood_metrics(items, reqs, scores)
    result.update(_harness_mc(model, tokenizer, items, batch_size, max_len, task))
    outputs: list[str] = []
    if gen is not None:
        outputs = generate_responses(model, tokenizer, prompts, batch_size, max_len, gen,
                                     desc=f"{task} generate")
        result.update(_generation_metrics(items, outputs))
    else:
        result.update({"refusal_rate": None, "n_harmful": 0, "exact_match": None, "n_answer": 0})
    result["n_items"] = len(items)
    return result, outputs

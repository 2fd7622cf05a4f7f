"""The method's four claims, checked against a finished run's own outputs (never by hand).

(a) each expert beats the base on its own dimension;
(b) the fused model is at least as good as the best single expert on every dimension, within a
    tolerance;
(c) the fused model's mean score beats every merge baseline's mean;
(d) each task's tokens route top-1 to the task's own expert at least `routing_target` of the time
    (the expert-load profile, averaged over layers).

Inputs are `<run>/eval/report.json` and `<run>/profile/expert_load.json`. `h3fusion run` prints
the result and writes `<run>/claims.json`; the end-to-end test asserts it (with looser margins).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..layout import RunLayout

MERGE_PREFIX = "merge_"


@dataclass
class Claim:
    name: str          # "a:helpful", "b:honest", "c:merge_ties", "d:harmless", ...
    passed: bool
    value: float       # the measured number the claim is about
    bound: float       # what it had to reach (strictly beat for a/c, at least for b/d)
    detail: str


def _claim_a(scores: dict, dims: list[str]) -> list[Claim]:
    out = []
    for task in dims:
        value, base = scores[task][task], scores["base"][task]
        out.append(Claim(f"a:{task}", value > base, value, base,
                         f"{task} expert {value:.4f} vs base {base:.4f} on {task}"))
    return out


def _claim_b(scores: dict, dims: list[str], fused: str, tolerance: float) -> list[Claim]:
    out = []
    for task in dims:
        best = max(dims, key=lambda e: scores[e][task])
        value, bound = scores[fused][task], scores[best][task] - tolerance
        out.append(Claim(f"b:{task}", value >= bound, value, bound,
                         f"fused {value:.4f} vs best expert ({best}) {scores[best][task]:.4f} "
                         f"- tolerance {tolerance}"))
    return out


def _claim_c(scores: dict, fused: str) -> list[Claim]:
    merges = sorted(m for m in scores if m.startswith(MERGE_PREFIX))
    if not merges:
        raise ValueError("report.json has no merge_* models: run the merge stage first")
    value = scores[fused]["mean"]
    return [Claim(f"c:{m}", value > scores[m]["mean"], value, scores[m]["mean"],
                  f"fused mean {value:.4f} vs {m} mean {scores[m]['mean']:.4f}") for m in merges]


def _claim_d(profile: dict, dims: list[str], routing_target: float) -> list[Claim]:
    out = []
    for task in dims:
        acc = profile["tasks"][task]["own_top1_acc"]
        if acc is None:
            raise ValueError(f"expert_load.json: task {task!r} has no own expert")
        first = (profile["tasks"][task].get("first_response_token") or {}).get("own_top1_acc")
        at_first = "" if first is None else f"; at the first-response-token position {first:.1%}"
        out.append(Claim(f"d:{task}", acc >= routing_target, acc, routing_target,
                         f"{task} {profile.get('tokens', 'all')} tokens routed top-1 to their own "
                         f"expert {acc:.1%} (target {routing_target:.0%}){at_first}"))
    return out


def check_claims(report: dict, profile: dict, *, tolerance: float | None = None,
                 routing_target: float = 0.9) -> list[Claim]:
    """All four claims, for the report's dimensions (its `score_metrics` keys, in order);
    `tolerance` defaults to the one the report was made with."""
    scores, fused = report["scores"], report["fused_model"]
    dims = list(report["score_metrics"])
    missing = [m for m in ("base", *dims, fused) if m not in scores]
    if missing:
        raise ValueError(f"report.json lacks scores for {missing}")
    tol = report["tolerance"] if tolerance is None else tolerance
    return (_claim_a(scores, dims) + _claim_b(scores, dims, fused, tol) + _claim_c(scores, fused)
            + _claim_d(profile, dims, routing_target))


def check_run(run: RunLayout, **kwargs) -> list[Claim]:
    paths = [run.eval / "report.json", run.profile / "expert_load.json"]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: the evaluate and profile stages must finish first")
    report, profile = (json.loads(p.read_text()) for p in paths)
    return check_claims(report, profile, **kwargs)


def format_claims(claims: list[Claim]) -> str:
    lines = [f"  [{'PASS' if c.passed else 'FAIL'}] ({c.name}) {c.detail}" for c in claims]
    passed = sum(c.passed for c in claims)
    return "\n".join([f"method claims: {passed}/{len(claims)} hold"] + lines)


def claims_json(claims: list[Claim]) -> dict:
    return {"all_passed": all(c.passed for c in claims), "claims": [asdict(c) for c in claims]}

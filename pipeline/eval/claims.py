"""The method's four claims, checked against a finished run's own outputs (never by hand).

(a) each expert beats the base on its own dimension: the paired bootstrap interval of
    expert - base lies wholly above 0 (verdict "holds");
(b) the fused model is at least as good as the best single expert (highest point score) on
    every dimension: passes on "holds" or "tie" (the interval contains 0: no evidence it is
    worse, which is NOT evidence it is as good), fails when the interval is wholly below 0;
(c) the fused model's mean score beats every merge baseline's (and every ensemble's and the
    multi-task model's, when the run built them): verdict "holds" on the mean. Not an ensemble
    whose method is a `ceiling` (pipeline.registry.ENSEMBLES): the oracle router reads each test
    prompt's dimension, a ceiling of per-prompt selection rather than a baseline
    (docs/baselines.md); its comparison stays in the report;
(d) each task's tokens route top-1 to the task's own expert at least `routing_target` of the time
    (the expert-load profile, averaged over layers). A task's rows are those whose routing label
    is the task (docs/data.md "Routing labels"): a benign request in the harmless set is the
    helpful expert's, the label the gating loss trains the router towards.

Inputs are `<run>/eval/report.json` (its `comparisons` and `expert_vs_base`, pipeline.eval.report)
and `<run>/profile/expert_load.json`. `h3fusion run` prints the result and writes
`<run>/claims.json` (verdict and interval of every claim).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from ..layout import RunLayout
from ..registry import ENSEMBLES

MERGE_PREFIX = "merge_"
ENSEMBLE_PREFIX = "ensemble_"
# the other baselines claim (c) compares with when present: ensembles, the dense multi-task
# models (`multitask_data_matched`, `multitask_compute_matched`)
BASELINE_PREFIXES = (ENSEMBLE_PREFIX, "multitask_")


def is_ceiling(model: str) -> bool:
    """Reported, never a claim-(c) baseline: an ensemble whose method is a `ceiling` (the oracle
    router knows each test prompt's dimension)."""
    method = model[len(ENSEMBLE_PREFIX):] if model.startswith(ENSEMBLE_PREFIX) else None
    return method in ENSEMBLES and ENSEMBLES.get(method, f"report model {model!r}").ceiling


@dataclass
class Claim:
    name: str          # "a:helpful", "b:honest", "c:merge_ties", "d:harmless", ...
    passed: bool
    value: float       # the measured number: a score difference (a-c), a routing accuracy (d)
    bound: float       # what the interval / value is compared with (0 for a-c, the target for d)
    detail: str
    verdict: str       # holds / tie / fails
    interval: Optional[list[float]] = None   # the paired 95 % interval of the difference (a-c)


def _diff_text(c: dict) -> str:
    return f"diff {c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] -> {c['verdict']}"


def _from_comparison(name: str, c: dict, passed: bool, detail: str) -> Claim:
    return Claim(name, passed, c["diff"], 0.0, f"{detail}: {_diff_text(c)}", c["verdict"],
                 [c["low"], c["high"]])


def _claim_a(report: dict, dims: list[str]) -> list[Claim]:
    out = []
    for task in dims:
        c = report["expert_vs_base"][task]
        out.append(_from_comparison(f"a:{task}", c, c["verdict"] == "holds",
                                    f"{task} expert vs base on {task} (passes only if it holds)"))
    return out


def _claim_b(report: dict, dims: list[str], fused: str) -> list[Claim]:
    scores, out = report["scores"], []
    for task in dims:
        best = max(dims, key=lambda e: scores[e][task])
        c = report["comparisons"][best][task]
        note = {"holds": "fused beats it", "tie": "a tie passes as 'at least as good' (no evidence "
                "of being worse, not evidence of being as good)", "fails": "fused is worse"}[c["verdict"]]
        out.append(_from_comparison(f"b:{task}", c, c["verdict"] in ("holds", "tie"),
                                    f"{fused} vs best expert ({best}) on {task}; {note}"))
    return out


def _claim_c(report: dict, fused: str) -> list[Claim]:
    """Fused vs every merge (required), every ensemble but the oracle and the multi-task
    baseline (when the run built them) on the mean score."""
    merges = [m for m in report["scores"] if m.startswith(MERGE_PREFIX)]
    if not merges:
        raise ValueError("report.json has no merge_* models: run the merge stage first")
    others = sorted(m for m in report["scores"] if m.startswith(BASELINE_PREFIXES) and not is_ceiling(m))
    return [_from_comparison(f"c:{m}", report["comparisons"][m]["mean"],
                             report["comparisons"][m]["mean"]["verdict"] == "holds",
                             f"{fused} vs {m} on the mean score (passes only if it holds)")
            for m in sorted(merges) + others]


def _claim_d(profile: dict, dims: list[str], routing_target: float) -> list[Claim]:
    out = []
    for task in dims:
        acc = profile["tasks"][task]["own_top1_acc"]
        if acc is None:
            raise ValueError(f"expert_load.json: task {task!r} has no own expert")
        first = (profile["tasks"][task].get("first_response_token") or {}).get("own_top1_acc")
        at_first = "" if first is None else f"; at the first-response-token position {first:.1%}"
        ok = acc >= routing_target
        out.append(Claim(f"d:{task}", ok, acc, routing_target,
                         f"{task} {profile.get('tokens', 'all')} tokens routed top-1 to their own "
                         f"expert {acc:.1%} (target {routing_target:.0%}){at_first}",
                         "holds" if ok else "fails"))
    return out


def check_claims(report: dict, profile: dict, *, routing_target: float = 0.9) -> list[Claim]:
    """All four claims, for the report's scored dimensions (its `score_metrics`, in order)."""
    if "comparisons" not in report or "expert_vs_base" not in report:
        raise ValueError("report.json has no paired comparisons (made before intervals were "
                         "reported): rerun `h3fusion evaluate`")
    scores, fused = report["scores"], report["fused_model"]
    dims = list(report["score_metrics"])
    unscored = [d for d in dims if report["score_metrics"][d] is None]
    if unscored:
        raise ValueError(f"dimensions {unscored} have no score (no score metric every model has), "
                         f"so their claims cannot be checked")
    missing = [m for m in ("base", *dims, fused) if m not in scores]
    if missing:
        raise ValueError(f"report.json lacks scores for {missing}")
    return (_claim_a(report, dims) + _claim_b(report, dims, fused) + _claim_c(report, fused)
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
    return "\n".join([f"method claims: {passed}/{len(claims)} pass"] + lines)


def claims_json(claims: list[Claim]) -> dict:
    return {"all_passed": all(c.passed for c in claims), "claims": [asdict(c) for c in claims]}

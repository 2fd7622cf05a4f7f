"""The method-claims checker (pipeline/eval/claims.py) on synthetic reports."""
import json
import random

import pytest

from pipeline.eval.claims import check_claims, check_run, claims_json, format_claims
from pipeline.eval.report import score_report
from pipeline.layout import RunLayout

DIMS = ("helpful", "harmless", "honest")


def _cmp(diff, low, high):
    verdict = "holds" if low > 0 else "fails" if high < 0 else "tie"
    return {"diff": diff, "low": low, "high": high, "verdict": verdict, "rel_pct": None}


def _report(b=(0.05, 0.02, 0.04), b_width=0.03, c=(0.1, 0.05), a_low=0.1):
    """Point scores plus the paired intervals the claims read: fused − best expert per dimension
    is b[i] ± b_width; fused − merge on the mean is c[i] ± 0.04; each expert − base a_low .. +0.2."""
    s = lambda h, a, o: {"helpful": h, "harmless": a, "honest": o, "mean": (h + a + o) / 3}  # noqa: E731
    scores = {"base": s(0.5, 0.1, 0.1), "helpful": s(0.8, 0.1, 0.1), "harmless": s(0.5, 0.7, 0.1),
              "honest": s(0.5, 0.1, 0.6), "merge_average": s(0.6, 0.3, 0.3),
              "merge_ties": s(0.6, 0.4, 0.3), "fused": s(0.85, 0.72, 0.64)}
    comparisons = {m: {d: _cmp(0.3, 0.2, 0.4) for d in DIMS + ("mean",)} for m in scores if m != "fused"}
    for d, diff in zip(DIMS, b):   # the best expert of dimension d is the expert d
        comparisons[d][d] = _cmp(diff, diff - b_width, diff + b_width)
    for m, diff in zip(("merge_average", "merge_ties"), c):
        comparisons[m]["mean"] = _cmp(diff, diff - 0.04, diff + 0.04)
    return {"scores": scores, "fused_model": "fused", "comparisons": comparisons,
            "expert_vs_base": {d: {"expert": d, **_cmp(a_low + 0.1, a_low, a_low + 0.2)} for d in DIMS},
            "score_metrics": {d: f"{d}/pref_acc" for d in DIMS}}


def _profile(accs=(0.95, 0.92, 0.91)):
    return {"tokens": "response", "tasks": {t: {"own_top1_acc": a} for t, a in zip(DIMS, accs)}}


def _failed(claims):
    return sorted(c.name for c in claims if not c.passed)


def test_all_claims_pass_for_a_good_run_with_verdicts_and_intervals():
    claims = check_claims(_report(), _profile())
    assert len(claims) == 3 + 3 + 2 + 3 and _failed(claims) == []
    assert claims_json(claims)["all_passed"] and "11/11 pass" in format_claims(claims)
    out = claims_json(claims)["claims"]
    assert all(c["verdict"] in ("holds", "tie", "fails") for c in out)
    b = next(c for c in out if c["name"] == "b:helpful")
    assert b["verdict"] == "holds" and b["interval"] == [pytest.approx(0.02), pytest.approx(0.08)]
    assert next(c for c in out if c["name"] == "d:honest")["interval"] is None


def test_b_passes_on_a_tie_and_says_so_and_fails_wholly_below_zero():
    tie = check_claims(_report(b=(0.0, 0.02, 0.04)), _profile())
    b = next(c for c in tie if c.name == "b:helpful")
    assert b.passed and b.verdict == "tie" and "a tie passes as 'at least as good'" in b.detail
    worse = check_claims(_report(b=(-0.05, 0.02, 0.04)), _profile())
    assert _failed(worse) == ["b:helpful"]
    assert next(c for c in worse if c.name == "b:helpful").verdict == "fails"


def test_a_and_c_pass_only_when_the_interval_holds():
    assert _failed(check_claims(_report(a_low=-0.01), _profile())) == ["a:harmless", "a:helpful", "a:honest"]
    assert _failed(check_claims(_report(c=(0.1, 0.02)), _profile())) == ["c:merge_ties"]   # tie
    assert _failed(check_claims(_report(c=(-0.1, 0.1)), _profile())) == ["c:merge_average"]


def test_c_compares_with_ensembles_but_not_the_oracle_ceiling():
    report = _report()
    for m in ("ensemble_avg", "ensemble_oracle"):
        report["scores"][m] = dict(report["scores"]["merge_ties"])
        report["comparisons"][m] = {d: _cmp(-0.1, -0.2, -0.05) for d in DIMS + ("mean",)}
    names = {c.name for c in check_claims(report, _profile())}
    assert "c:ensemble_avg" in names and "c:ensemble_oracle" not in names


def test_d_routing_target():
    assert _failed(check_claims(_report(), _profile((0.95, 0.89, 0.91)))) == ["d:harmless"]
    assert _failed(check_claims(_report(), _profile((0.95, 0.89, 0.91)), routing_target=0.8)) == []


def test_b_compares_with_the_best_expert_by_point_score():
    report = _report()
    report["scores"]["honest"]["helpful"] = 0.9    # now the best helpful expert is `honest`
    report["comparisons"]["honest"]["helpful"] = _cmp(-0.05, -0.08, -0.02)
    claims = check_claims(report, _profile())
    assert _failed(claims) == ["b:helpful"]
    assert "best expert (honest)" in next(c for c in claims if c.name == "b:helpful").detail


def test_claims_from_a_report_built_from_per_item_data():
    """score_report's comparisons feed the claims: a fused model that wins most items passes."""
    rng = random.Random(0)
    skill = {"base": 0.2, "helpful": 0.5, "harmless": 0.5, "honest": 0.5, "merge_ties": 0.45, "fused": 0.9}
    n = 60
    layout = {d: {"group": [i // 2 for i in range(n)], "kind": ["pair"] * n} for d in DIMS}
    metrics = {m: {d: {"n_items": n, "per_item": {"pref_acc": [float(rng.random() < p + (0.3 if m == d else 0))
                                                                for _ in range(n)]}}
                   for d in DIMS} for m, p in skill.items()}
    report = {"fused_model": "fused", **score_report(metrics, layout, "fused", n_boot=2_000)}
    assert report["score_metrics"] == {d: f"{d}/pref_acc" for d in DIMS}
    claims = check_claims(report, _profile())
    assert _failed(claims) == [] and {c.verdict for c in claims if c.name.startswith("c:")} == {"holds"}


def test_missing_inputs_are_clear_errors(tmp_path):
    report = _report()
    del report["scores"]["harmless"]
    with pytest.raises(ValueError, match="lacks scores"):
        check_claims(report, _profile())
    old = {k: v for k, v in _report().items() if k != "comparisons"}
    with pytest.raises(ValueError, match="no paired comparisons"):
        check_claims(old, _profile())
    unscored = _report()
    unscored["score_metrics"]["honest"] = None
    with pytest.raises(ValueError, match=r"\['honest'\] have no score"):
        check_claims(unscored, _profile())
    no_merge = _report()
    for m in ("merge_average", "merge_ties"):
        del no_merge["scores"][m]
    with pytest.raises(ValueError, match="no merge_"):
        check_claims(no_merge, _profile())
    run = RunLayout.at(tmp_path)
    with pytest.raises(FileNotFoundError, match="report.json"):
        check_run(run)
    run.eval.mkdir()
    (run.eval / "report.json").write_text(json.dumps(_report()))
    run.profile.mkdir()
    (run.profile / "expert_load.json").write_text(json.dumps(_profile()))
    assert len(check_run(run)) == 11

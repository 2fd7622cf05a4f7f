"""The method-claims checker (pipeline/eval/claims.py) on hand-made reports."""
import json

import pytest

from pipeline.eval.claims import check_claims, check_run, claims_json, format_claims
from pipeline.layout import RunLayout


def _report(fused=(0.80, 0.70, 0.60), tolerance=0.02):
    s = lambda h, a, o: {"helpful": h, "harmless": a, "honest": o, "mean": (h + a + o) / 3}  # noqa: E731
    scores = {"base": s(0.5, 0.1, 0.1), "helpful": s(0.8, 0.1, 0.1), "harmless": s(0.5, 0.7, 0.1),
              "honest": s(0.5, 0.1, 0.6), "merge_average": s(0.6, 0.3, 0.3),
              "merge_ties": s(0.6, 0.4, 0.3), "fused": s(*fused)}
    return {"scores": scores, "fused_model": "fused", "tolerance": tolerance,
            "score_metrics": {d: f"{d}/pref_acc" for d in ("helpful", "harmless", "honest")}}


def _profile(accs=(0.95, 0.92, 0.91)):
    return {"tokens": "response", "tasks": {t: {"own_top1_acc": a} for t, a in
                                             zip(("helpful", "harmless", "honest"), accs)}}


def _failed(claims):
    return sorted(c.name for c in claims if not c.passed)


def test_all_claims_hold_for_a_good_run():
    claims = check_claims(_report(), _profile())
    assert len(claims) == 3 + 3 + 2 + 3 and _failed(claims) == []
    assert claims_json(claims)["all_passed"] and "11/11 hold" in format_claims(claims)


def test_each_claim_fails_on_its_own_evidence():
    # (b) fused helpful 0.77 < best 0.80 - 0.02; within tolerance 0.79 passes
    assert _failed(check_claims(_report(fused=(0.77, 0.70, 0.60)), _profile())) == ["b:helpful"]
    assert _failed(check_claims(_report(fused=(0.79, 0.70, 0.60)), _profile())) == []
    assert _failed(check_claims(_report(fused=(0.77, 0.70, 0.60)), _profile(), tolerance=0.05)) == []
    # (c) a weak fused model loses to the merges' mean as well
    weak = _failed(check_claims(_report(fused=(0.5, 0.3, 0.2)), _profile()))
    assert {"c:merge_average", "c:merge_ties"} <= set(weak)
    # (d) routing below target
    assert _failed(check_claims(_report(), _profile((0.95, 0.89, 0.91)))) == ["d:harmless"]
    assert _failed(check_claims(_report(), _profile((0.95, 0.89, 0.91)), routing_target=0.8)) == []


def test_expert_not_better_than_base_fails_a():
    report = _report()
    report["scores"]["honest"]["honest"] = 0.1      # equal to base: not "beats"
    assert "a:honest" in _failed(check_claims(report, _profile()))


def test_missing_inputs_are_clear_errors(tmp_path):
    report = _report()
    del report["scores"]["harmless"]
    with pytest.raises(ValueError, match="lacks scores"):
        check_claims(report, _profile())
    run = RunLayout.at(tmp_path)
    with pytest.raises(FileNotFoundError, match="report.json"):
        check_run(run)
    run.eval.mkdir()
    (run.eval / "report.json").write_text(json.dumps(_report()))
    run.profile.mkdir()
    (run.profile / "expert_load.json").write_text(json.dumps(_profile()))
    assert len(check_run(run)) == 11

"""`h3fusion aggregate` (pipeline/eval/aggregate.py) on synthetic run dirs."""
import json

import pytest

from pipeline.commands import main
from pipeline.eval.aggregate import aggregate_runs, write_aggregate

DIMS = ("helpful", "honest")


def _write_run(root, seed, fused, groups=(0, 0, 1, 2), claims=None, split="test"):
    """A run dir holding eval/report.json (and claims.json) as `h3fusion evaluate` writes them."""
    s = lambda h, o: {"helpful": h, "honest": o, "mean": (h + o) / 2}  # noqa: E731
    scores = {"base": s(0.5, 0.4), "fused": s(*fused)}
    cmp = lambda d, diff: {"diff": diff, "low": diff - 0.05, "high": diff + 0.05,  # noqa: E731
                           "verdict": "holds" if diff > 0.05 else "tie", "rel_pct": None}
    report = {"split": split, "config": {"seed": seed}, "fused_model": "fused",
              "items": {d: {"group": list(groups), "kind": ["pair"] * len(groups)} for d in DIMS},
              "score_metrics": {d: f"{d}/pref_acc" for d in DIMS}, "scores": scores,
              "comparisons": {"base": {d: cmp(d, scores["fused"][d] - scores["base"][d])
                                       for d in DIMS + ("mean",)}}}
    run = root / f"seed{seed}"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    if claims is not None:
        (run / "claims.json").write_text(json.dumps({"all_passed": all(claims), "claims": [
            {"name": "c:merge_ties", "passed": p, "verdict": "holds" if p else "tie"} for p in claims]}))
    return run


def test_mean_sd_across_seeds_and_per_seed_verdicts(tmp_path):
    runs = [_write_run(tmp_path, 0, (0.7, 0.5), claims=[True]),
            _write_run(tmp_path, 1, (0.8, 0.5), claims=[False]),
            _write_run(tmp_path, 2, (0.9, 0.5))]
    agg = aggregate_runs(runs)
    assert agg["n_seeds"] == 3 and agg["seeds"] == [0, 1, 2]
    helpful = agg["scores"]["fused"]["helpful"]
    assert helpful["mean"] == pytest.approx(0.8) and helpful["sd"] == pytest.approx(0.1)
    assert helpful["per_seed"] == [0.7, 0.8, 0.9] and helpful["n_seeds"] == 3
    assert agg["scores"]["fused"]["honest"]["sd"] == 0.0
    diff = agg["comparisons"]["base"]["helpful"]
    assert diff["diff"]["mean"] == pytest.approx(0.3) and diff["verdicts"] == ["holds"] * 3
    assert agg["comparisons"]["base"]["honest"]["verdicts"] == ["holds", "holds", "holds"]
    assert agg["claims"]["c:merge_ties"] == {"passed": [True, False, None], "verdicts": ["holds", "tie", None]}


def test_written_atomically_by_the_command(tmp_path, capsys):
    runs = [_write_run(tmp_path, s, (0.6 + 0.1 * s, 0.5)) for s in range(2)]
    out = tmp_path / "agg"
    assert main(["aggregate", "--runs", *map(str, runs), "--out", str(out)]) == 0
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["scores"]["fused"]["mean"]["n_seeds"] == 2
    md = (out / "aggregate.md").read_text()
    assert "| fused | 0.650 ± 0.071 |" in md and "holds, holds" in md
    assert "aggregate.md" in capsys.readouterr().out
    assert main(["aggregate", "--runs", *map(str, runs), "--out", str(out)]) == 2   # exists
    write_aggregate(runs, out, overwrite=True)


def test_runs_over_other_items_are_one_error_naming_run_and_task(tmp_path):
    a = _write_run(tmp_path, 0, (0.7, 0.5))
    b = _write_run(tmp_path, 1, (0.7, 0.5), groups=(0, 1, 1, 2))
    with pytest.raises(ValueError, match=r"run .*seed1, task 'helpful': other eval items"):
        aggregate_runs([a, b])
    c = _write_run(tmp_path, 2, (0.7, 0.5), split="dev")
    with pytest.raises(ValueError, match=r"seed2 evaluated split 'dev'"):
        aggregate_runs([a, c])
    with pytest.raises(FileNotFoundError, match="report.json"):
        aggregate_runs([a, tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="given twice"):
        aggregate_runs([a, a])
    out = tmp_path / "never"
    with pytest.raises(ValueError):
        write_aggregate([a, b], out)
    assert not out.exists()


def _write_scored_run(root, name, fused, base=(0, 1, 0, 0), expert_seed=0, fusion_seed=1):
    """A run whose report.json carries per-item pref_acc values, as `h3fusion evaluate` writes
    them, and a resolved_config.yaml with its training seeds."""
    from pipeline.eval.report import score_report
    layout = {d: {"group": [0, 0, 1, 2], "kind": ["pair"] * 4} for d in DIMS}
    overrides = {d: ["pref_acc"] for d in DIMS}
    metrics = {m: {d: {"per_item": {"pref_acc": list(v)}} for d in DIMS}
               for m, v in (("base", base), ("fused", fused))}
    report = {"split": "test", "config": {"seed": 0, "score_metrics": overrides}, "items": layout,
              "metrics": metrics, "fused_model": "fused",
              "result_keys": {"base": "k-base", "fused": f"k-fused-{name}"},
              **score_report(metrics, layout, "fused", n_boot=200, seed=0, score_metrics=overrides)}
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    (run / "resolved_config.yaml").write_text(
        f"expert:\n  train:\n    seed: {expert_seed}\nfusion:\n  train:\n    seed: {fusion_seed}\n")
    return run


def test_pooled_scores_average_the_items_over_seeds_with_one_paired_interval(tmp_path):
    runs = [_write_scored_run(tmp_path, "a", (1, 0, 1, 1), fusion_seed=1),
            _write_scored_run(tmp_path, "b", (0, 0, 1, 1), fusion_seed=2)]
    agg = aggregate_runs(runs)
    pooled = agg["pooled"]
    # group means (groups 0, 0, 1, 2): a = (0.5, 1, 1) -> 5/6, b = (0, 1, 1) -> 2/3; base 1/6
    fused = pooled["scores"]["fused"]["helpful"]
    assert fused["estimate"] == pytest.approx(0.75)
    assert fused["estimate"] == pytest.approx(agg["scores"]["fused"]["helpful"]["mean"])
    c = pooled["comparisons"]["base"]["mean"]
    assert c["diff"] == pytest.approx(0.75 - 1 / 6) and c["low"] <= c["diff"] <= c["high"]
    assert c["verdict"] in ("holds", "tie") and pooled["bootstrap"]["n_boot"] == 200
    assert agg["training_seeds"] == [{"expert": 0, "fusion": 1}, {"expert": 0, "fusion": 2}]
    write_aggregate(runs, tmp_path / "agg")
    md = (tmp_path / "agg" / "aggregate.md").read_text()
    assert "Training seeds per run (expert, fusion): (0, 1), (0, 2)." in md
    assert "expert seed is the same in every run" in md
    assert agg["same_in_every_run"] == ["base"]
    assert "same weights in every run (so sd 0 by construction): base." in md
    assert f"| base | {c['diff']:+.3f} [" in md.split("averaged over the 2 runs")[1]


def test_no_pooled_section_without_per_item_metrics(tmp_path):
    runs = [_write_run(tmp_path, s, (0.6 + 0.1 * s, 0.5)) for s in range(2)]
    agg = aggregate_runs(runs)
    assert agg["pooled"] is None and agg["training_seeds"] == [None, None]
    assert agg["same_in_every_run"] == []   # no result keys: nothing is claimed shared
    write_aggregate(runs, tmp_path / "agg")
    assert "averaged over the" not in (tmp_path / "agg" / "aggregate.md").read_text()

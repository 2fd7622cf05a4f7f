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


# ---- seeds x items: runs resampled as clusters, item groups drawn once for all of them -------

def _double_loop(per_seed_samples, draws):
    """resample r = mean over its drawn runs (in draw order) of that run's resampled score."""
    return [sum(per_seed_samples[s][r] for s in row) / len(row) for r, row in enumerate(draws)]


def test_seeds_x_items_equals_a_double_loop_over_drawn_seeds_and_items():
    """Three runs on prompts shared by two dimensions (test_eval_bootstrap's joint fixture):
    per dimension, each drawn run's score on the item draw `_naive_scores` makes (the same draw
    for every run) averaged over the drawn runs; the mean row likewise from the joint draws."""
    import random

    import torch
    from test_eval_bootstrap import _naive_joint_means, _naive_scores

    from pipeline.eval.bootstrap import _CHUNK, crossed_bootstrap, make_design, paired_bootstrap

    keys = {"helpful": list("aabcdefgh"), "harmless": ["x1", "x2", "x3", "c", "d", "e", "f", "x4"]}
    strata = {"helpful": ["all"] * 9, "harmless": ["harm"] * 3 + ["benign"] * 4 + ["harm"]}
    designs = {d: make_design(keys[d], strata[d]) for d in keys}
    rng = random.Random(6)   # dyadic values: every per-run score is exact, so equality is exact
    runs = [{d: {m: [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in keys[d]] for m in ("x", "y")}
             for d in keys} for _ in range(3)]
    n_boot, seed = 1_200, 5   # more than one chunk
    pb = crossed_bootstrap(runs, designs, n_boot=n_boot, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2 ** 48)
    draws = [row for lo in range(0, n_boot, _CHUNK)
             for row in torch.randint(3, (min(_CHUNK, n_boot - lo), 3), generator=gen).tolist()]
    assert len({tuple(sorted(row)) for row in draws}) == 10   # every multiset of 3 runs occurs
    for i, m in enumerate(pb.models):
        helpful = [_naive_scores(v["helpful"][m], designs["helpful"], n_boot, seed, 0) for v in runs]
        harmless = [_naive_scores(v["harmless"][m], designs["harmless"], n_boot, seed, 1) for v in runs]
        assert pb.samples[i, 0].tolist() == _double_loop(helpful, draws)
        assert pb.samples[i, 1].tolist() == _double_loop(harmless, draws)
        mean = [_naive_joint_means({d: v[d][m] for d in keys}, keys, strata, n_boot, seed) for v in runs]
        assert pb.samples[i, 2].tolist() == pytest.approx(_double_loop(mean, draws), abs=1e-12)
        one = [paired_bootstrap(v, designs, n_boot=10, seed=seed).estimates[i] for v in runs]
        assert pb.estimates[i].tolist() == pytest.approx((sum(one) / 3).tolist(), abs=1e-15)


def _two_seed_values(fused_by_seed):
    items = 40
    base = [float(i % 2) for i in range(items)]
    return [{"d": {"base": base, "fused": [min(1.0, max(0.0, f + 0.1 * (i % 3 - 1)))
                                           for i in range(items)]}} for f in fused_by_seed]


def test_seeds_are_resampled_not_only_items():
    """Two runs whose fused model scores 0.9 and 0.1: resampling items only (the runs' per-item
    average) gives a narrow interval around 0.5; seeds x items must span most of [0.1, 0.9].
    Two identical runs give exactly the item-only bootstrap of one run (the same item draws)."""
    import torch

    from pipeline.eval.bootstrap import crossed_bootstrap, make_design, paired_bootstrap

    design = {"d": make_design(list(range(40)), ["s"] * 40)}
    far = _two_seed_values((0.9, 0.1))
    crossed = crossed_bootstrap(far, design, n_boot=2_000, seed=3)
    averaged = {"d": {m: [(a + b) / 2 for a, b in zip(far[0]["d"][m], far[1]["d"][m])]
                      for m in ("base", "fused")}}
    items_only = paired_bootstrap(averaged, design, n_boot=2_000, seed=3)
    width = lambda iv: iv.high - iv.low  # noqa: E731
    assert crossed.interval("fused", "d").estimate == pytest.approx(0.5, abs=0.01)
    assert width(items_only.interval("fused", "d")) < 0.1
    assert width(crossed.interval("fused", "d")) > 0.7
    assert width(crossed.difference("fused", "base", "d")) > 0.7
    same = _two_seed_values((0.6, 0.6))
    assert torch.equal(crossed_bootstrap(same, design, n_boot=500, seed=3).samples,
                       paired_bootstrap(same[0], design, n_boot=500, seed=3).samples)


def test_aggregate_shows_seeds_x_items_intervals_with_each_sd(tmp_path):
    runs = [_write_scored_run(tmp_path, "a", (1, 0, 1, 1), fusion_seed=1),
            _write_scored_run(tmp_path, "b", (0, 0, 1, 1), fusion_seed=2)]
    agg = write_aggregate(runs, tmp_path / "agg")
    sx = agg["seeds_x_items"]
    fused = sx["scores"]["fused"]["helpful"]
    assert fused["estimate"] == pytest.approx(0.75) and fused["low"] <= 0.75 <= fused["high"]
    assert fused["sd_seeds"] == pytest.approx(agg["scores"]["fused"]["helpful"]["sd"])
    assert sx["scores"]["base"]["mean"]["sd_seeds"] == 0.0
    diff = sx["comparisons"]["base"]["mean"]
    assert diff["diff"] == pytest.approx(0.75 - 1 / 6) and diff["verdict"] in ("holds", "tie")
    assert diff["sd_seeds"] == pytest.approx(agg["comparisons"]["base"]["mean"]["diff"]["sd"])
    assert sx["bootstrap"]["n_seeds"] == 2 and sx["bootstrap"]["n_boot"] == 200
    md = (tmp_path / "agg" / "aggregate.md").read_text()
    assert "## Seeds × items: 2 runs, 200 resamples (95 %)" in md
    assert f"| fused | {fused['estimate']:.3f} [{fused['low']:.3f}, {fused['high']:.3f}] (sd " in md
    assert f"| base | {diff['diff']:+.3f} [" in md.split("seeds × items:")[1]


def test_runs_scoring_other_items_are_one_error(tmp_path):
    """The same item layout, but one run left an item unscored: the seeds x items bootstrap
    needs the same scored items in every run, so aggregate names the run and the task."""
    a = _write_scored_run(tmp_path, "a", (1, 0, 1, 1))
    b = _write_scored_run(tmp_path, "b", (1, 0, 1, None), base=(0, 1, 0, None))
    with pytest.raises(ValueError, match=r"run .*b, task 'helpful': other scored items"):
        aggregate_runs([a, b])

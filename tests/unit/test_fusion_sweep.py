"""tools/sweep/fusion_sweep.py without training: grid expansion and validation, the dev-only rule,
resumability (which points run), failure records, and the sweep table (pipeline.eval.sweep_table)
from synthetic reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval.sweep_table import render_markdown, summarize
from tests.conftest import load_tool

sweep = load_tool("sweep/fusion_sweep.py")


# ----------------------------------------------------------------------------- grid

def test_mapping_grid_is_the_cartesian_product_in_key_order():
    points = sweep.expand_grid({"fusion.lambda_gate": [0.1, 1, 10], "fusion.gamma.helpful": [0, 1]})
    assert len(points) == 6
    assert points[0] == {"fusion.lambda_gate": 0.1, "fusion.gamma.helpful": 0}
    assert points[1] == {"fusion.lambda_gate": 0.1, "fusion.gamma.helpful": 1}
    assert points[-1] == {"fusion.lambda_gate": 10, "fusion.gamma.helpful": 1}


def test_list_grid_is_explicit_points():
    grid = [{}, {"fusion.trainable": "router", "fusion.train.lr": 1e-3}]
    assert sweep.expand_grid(grid) == grid


@pytest.mark.parametrize("grid, needle", [
    ({}, "empty grid"),
    ([], "empty grid"),
    ("fusion.lambda_gate", "got str"),
    ({"fusion.lambda_gate": 1.0}, "'fusion.lambda_gate' must map to a non-empty list"),
    ({"fusion.lambda_gate": []}, "'fusion.lambda_gate' must map to a non-empty list"),
    ({"data.builtin.seed": [0, 1]}, "'data.builtin.seed' cannot be swept"),
    ([{"fusion.top_k": 1}, "fusion.top_k=2"], "point 1 must be a mapping"),
    ([{"base.train.lr": 1.0}], "'base.train.lr' cannot be swept"),
])
def test_bad_grids_are_one_error_naming_the_problem(grid, needle):
    with pytest.raises(sweep.SweepError, match="grid") as err:
        sweep.expand_grid(grid, "grid")
    assert needle in str(err.value)


@pytest.mark.parametrize("grid", [{"eval.split": ["dev"]}, [{"eval.split": "test"}],
                                  {"fusion.top_k": [1], "eval.split": ["test"]}])
def test_a_grid_that_sets_eval_split_is_refused(grid):
    with pytest.raises(sweep.SweepError, match="'eval.split' cannot be set.*dev split only"):
        sweep.expand_grid(grid)


def test_set_may_tune_the_dev_eval_but_never_its_split():
    sweep.check_key("eval.max_items_per_task", "--set", sweep.SET_PREFIXES)
    with pytest.raises(sweep.SweepError, match="eval.split"):
        sweep.check_key("eval.split", "--set", sweep.SET_PREFIXES)
    with pytest.raises(sweep.SweepError, match="'eval.batch_size' cannot be swept"):
        sweep.check_key("eval.batch_size", "grid")


def test_load_grid_file_errors(tmp_path):
    with pytest.raises(sweep.SweepError, match="grid file not found"):
        sweep.load_grid(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion.top_k: [1, 2\n")
    with pytest.raises(sweep.SweepError, match="not valid YAML"):
        sweep.load_grid(bad)


# ----------------------------------------------------------------------------- configs

def test_points_resolve_with_eval_split_forced_to_dev(tmp_path):
    points = sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": 0.5}, {"fusion.gamma.helpful": 0}],
                                  tmp_path)
    assert [p["cfg"].eval.split for p in points] == ["dev", "dev"]
    assert points[0]["cfg"].fusion.lambda_gate == 0.5
    assert points[1]["cfg"].fusion.gamma["helpful"] == 0.0
    assert points[0]["id"] != points[1]["id"]
    again = sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": 0.5}], tmp_path)
    assert again[0]["id"] == points[0]["id"]           # stable: a rerun finds its results
    other_run = sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": 0.5}], tmp_path / "x")
    assert other_run[0]["id"] != points[0]["id"]


@pytest.mark.parametrize("point, needle", [
    ({"fusion.lambda_gat": 1}, "unknown config key 'fusion.lambda_gat'"),
    ({"fusion.gamma.nope": 1}, "nope"),
    ({"fusion.trainable": "everything"}, "fusion.trainable"),
    ({"fusion.top_k": "two"}, "fusion.top_k"),
])
def test_bad_values_fail_before_anything_runs_naming_the_key(tmp_path, point, needle):
    with pytest.raises(sweep.SweepError, match="point 0") as err:
        sweep.resolve_points("tiny", [], [point], tmp_path)
    assert needle in str(err.value)


def test_points_with_the_same_config_are_refused(tmp_path):
    with pytest.raises(sweep.SweepError, match="points 0 and 1 give the same config"):
        sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": 1}, {"fusion.lambda_gate": 1.0}], tmp_path)


def test_build_moe_reruns_only_when_the_init_settings_change(tmp_path):
    run = sweep.RunLayout.at(tmp_path)
    run.fused_init.mkdir()
    a, b, c = sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": 3}, {"fusion.top_k": 1},
                                                {"fusion.router_init": "normal"}], tmp_path)
    init = sweep.run_fusion_init(run, "tiny", [])
    assert [sweep.needs_build(p["cfg"], run, init) for p in (a, b, c)] == [False, True, True]
    run.fused_init.rmdir()   # no fused_init in the run: every point builds its own
    assert sweep.needs_build(a["cfg"], run, init)


def test_a_point_dir_links_the_run_inputs_and_copies_no_weights(tmp_path):
    run = sweep.RunLayout.at(tmp_path / "run")
    for name in sweep.REUSED + ("fused_init",):
        (run.root / name).mkdir(parents=True)
    (run.base / "model.safetensors").write_bytes(b"w")
    point = sweep.resolve_points("tiny", [], [{"fusion.top_k": 1}], run.root)[0]
    pdir = tmp_path / "sweep" / "points" / point["id"]
    config = sweep.prepare_point(pdir, run, point, build=True)
    assert all((pdir / n).is_symlink() and (pdir / n).resolve() == (run.root / n).resolve()
               for n in sweep.REUSED)
    assert not (pdir / "fused_init").exists()      # build_moe writes the point's own
    assert sweep.load_config(str(config)).eval.split == "dev"
    sweep.prepare_point(pdir, run, point, build=False)   # idempotent; links fused_init now
    assert (pdir / "fused_init").is_symlink()
    (pdir / "data").unlink()
    (pdir / "data").mkdir()
    with pytest.raises(sweep.SweepError, match="exists and is not a link"):
        sweep.prepare_point(pdir, run, point, build=False)


def test_fuse_runs_under_the_launcher_with_several_procs(tmp_path):
    point = sweep.resolve_points("tiny", [], [{"fusion.num_procs": 2}], tmp_path)[0]
    stages = {s.name: s for s in sweep.pipeline_stages(point["cfg"], sweep.RunLayout.at(tmp_path))}
    argv = sweep.stage_command(stages["fuse"], tmp_path / "config.yaml", tmp_path)
    assert argv[1:3] == ["-m", "pipeline.commands.launch"] and "--nproc-per-node=2" in argv
    assert argv[-5:] == ["fuse", "--config", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path)]
    ev = sweep.eval_argv(tmp_path / "config.yaml", tmp_path)
    assert ev[ev.index("--models") + 1] == f"fused={tmp_path / 'fused'}"
    assert ev[ev.index("--out") + 1] == str(tmp_path / "eval_dev")


# ----------------------------------------------------------------------------- reports and table

def write_report(path: Path, scores: dict, split: str = "dev", intervals: dict | None = None) -> Path:
    report = {"split": split, "scores": {"fused": scores},
              "score_metrics": {"helpful": "helpful/pref_acc", "honest": "honest/mc2"}}
    if intervals is not None:
        report["score_intervals"] = {"fused": intervals}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def ok_result(pid: str, overrides: dict, report: Path) -> dict:
    return {"id": pid, "overrides": overrides, "status": "ok", **sweep.read_dev_scores(report)}


def test_read_dev_scores_refuses_a_test_report(tmp_path):
    report = write_report(tmp_path / "r.json", {"helpful": 0.5, "honest": 0.5, "mean": 0.5}, split="test")
    with pytest.raises(ValueError, match="split 'test', expected 'dev'"):
        sweep.read_dev_scores(report)


def test_table_sorted_by_dev_mean_with_intervals_and_failures_last(tmp_path):
    iv = {"helpful": {"estimate": 0.8, "low": 0.7, "high": 0.9},
          "mean": {"estimate": 0.7, "low": 0.61, "high": 0.79}}
    good = ok_result("aaa", {"fusion.lambda_gate": 10},
                     write_report(tmp_path / "a.json", {"helpful": 0.8, "honest": 0.6, "mean": 0.7}, intervals=iv))
    weak = ok_result("bbb", {"fusion.lambda_gate": 0.1},
                     write_report(tmp_path / "b.json", {"helpful": 0.4, "honest": 0.6, "mean": 0.5}))
    failed = {"id": "ccc", "overrides": {"fusion.lambda_gate": 100}, "status": "failed",
              "failed_stage": "fuse", "returncode": 3, "log": "/s/points/ccc/log.txt"}
    summary = summarize([failed, weak, good], "/runs/r")
    assert [r["id"] for r in summary["points"]] == ["aaa", "bbb", "ccc"]
    assert summary["best"] == "aaa" and summary["dimensions"] == ["helpful", "honest"]
    md = render_markdown(summary)
    assert "| 1 | aaa | fusion.lambda_gate=10 | 0.800 [0.700, 0.900] | 0.600 | 0.700 [0.610, 0.790] | ok |" in md
    assert "| 2 | bbb | fusion.lambda_gate=0.1 | 0.400 | 0.600 | 0.500 | ok |" in md
    assert "failed: fuse exit 3, log /s/points/ccc/log.txt" in md
    assert "**best on dev:** point aaa" in md
    assert "itself a selection" in md and "test split, evaluated once" in md


def test_no_best_when_every_point_failed_and_mixed_metrics_are_flagged(tmp_path):
    failed = {"id": "x", "overrides": {}, "status": "failed", "failed_stage": "evaluate",
              "returncode": 2, "log": "l"}
    summary = summarize([failed])
    assert summary["best"] is None
    assert "none (no point finished with a score)" in render_markdown(summary)
    a = ok_result("a", {}, write_report(tmp_path / "a.json", {"helpful": 0.5, "honest": 0.5, "mean": 0.5}))
    b = {**a, "id": "b", "score_metrics": {"helpful": "helpful/ref_win_vs_base", "honest": "honest/mc2"}}
    summary = summarize([a, b])
    assert summary["mixed_score_metrics"] == {"helpful": ["helpful/pref_acc", "helpful/ref_win_vs_base"]}
    assert "**Warning:** dimension helpful" in render_markdown(summary)


# ----------------------------------------------------------------------------- resumability

def test_should_skip_done_points_and_failures_unless_retried(tmp_path):
    path = tmp_path / "result.json"
    assert not sweep.should_skip(path, retry_failed=False)
    sweep.write_json(path, {"status": "failed"})
    assert sweep.should_skip(path, retry_failed=False)
    assert not sweep.should_skip(path, retry_failed=True)
    sweep.write_json(path, {"status": "ok"})
    assert sweep.should_skip(path, retry_failed=True)


def test_sweep_runs_only_points_without_results_and_records_failures(tmp_path, monkeypatch):
    run = sweep.RunLayout.at(tmp_path / "run")
    for name in sweep.REUSED + ("fused_init",):
        (run.root / name).mkdir(parents=True)
    points = sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": v} for v in (1, 2, 3)], run.root)
    for p in points:
        p["build"] = False
    out = tmp_path / "sweep"
    done = ok_result(points[0]["id"], points[0]["overrides"],
                     write_report(tmp_path / "r.json", {"helpful": 0.6, "honest": 0.6, "mean": 0.6}))
    (out / "points" / points[0]["id"]).mkdir(parents=True)
    sweep.write_json(out / "points" / points[0]["id"] / sweep.RESULT, done)
    calls = []

    def fake_run_logged(name, argv, log, nprocs=1):
        calls.append((name, Path(log).parent.name))
        return 3   # every stage fails, as a diverging fuse would (non-finite loss: exit 3)

    monkeypatch.setattr(sweep, "run_logged", fake_run_logged)
    summary = sweep.sweep(run, points, out, retry_failed=False)
    assert calls == [("fuse", points[1]["id"]), ("fuse", points[2]["id"])]   # point 0 skipped
    assert [r["status"] for r in summary["points"]] == ["ok", "failed", "failed"]
    failed = json.loads((out / "points" / points[1]["id"] / sweep.RESULT).read_text())
    assert failed["failed_stage"] == "fuse" and failed["log"].endswith("log.txt")
    assert (out / "sweep.json").is_file() and "| 1 |" in (out / "sweep.md").read_text()
    calls.clear()
    sweep.sweep(run, points, out, retry_failed=False)   # a rerun: nothing left to run
    assert calls == []
    sweep.sweep(run, points, out, retry_failed=True)
    assert [c[0] for c in calls] == ["fuse", "fuse"]


def test_main_refuses_eval_split_before_creating_anything(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("fusion.lambda_gate: [1]\neval.split: [test]\n")
    (tmp_path / "run").mkdir()
    rc = sweep.main(["--run-dir", str(tmp_path / "run"), "--grid", str(grid),
                     "--out", str(tmp_path / "sweep"), "--config", "tiny"])
    assert rc == 2 and "eval.split" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
    grid.write_text("fusion.lambda_gate: [1]\n")
    rc = sweep.main(["--run-dir", str(tmp_path / "run"), "--grid", str(grid), "--out",
                     str(tmp_path / "sweep"), "--config", "tiny", "--set", "eval.split=test"])
    assert rc == 2 and "--set eval.split=test" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_run_without_its_inputs_or_dev_items_is_refused(tmp_path):
    run = sweep.RunLayout.at(tmp_path / "run")
    cfg = sweep.load_config("tiny")
    with pytest.raises(sweep.SweepError, match="lacks .*experts/helpful"):
        sweep.check_run_inputs(run, cfg)
    for path in [run.data / "eval", run.tokenizer, run.base] + [run.expert(t) for t in cfg.dimensions]:
        path.mkdir(parents=True)
    with pytest.raises(sweep.SweepError, match="the run's dev eval items"):
        sweep.check_run_inputs(run, cfg)


def test_a_point_whose_report_is_not_dev_is_recorded_failed(tmp_path, monkeypatch):
    run = sweep.RunLayout.at(tmp_path / "run")
    for name in sweep.REUSED + ("fused_init",):
        (run.root / name).mkdir(parents=True)
    point = sweep.resolve_points("tiny", [], [{"fusion.lambda_gate": 2}], run.root)[0]
    pdir = tmp_path / "sweep" / "points" / point["id"]

    def fake_run_logged(name, argv, log, nprocs=1):
        if name == "evaluate":   # a report of the wrong split must never count as a dev score
            write_report(Path(argv[argv.index("--out") + 1]) / "report.json",
                         {"helpful": 0.9, "honest": 0.9, "mean": 0.9}, split="test")
        return 0

    monkeypatch.setattr(sweep, "run_logged", fake_run_logged)
    result = sweep.run_point(point, run, pdir, build=False)
    assert result["status"] == "failed" and result["failed_stage"] == "report"
    assert "split 'test'" in result["error"] and "scores" not in result


def test_dimension_order_survives_the_result_file_and_ties_are_named(tmp_path):
    a = ok_result("a", {}, write_report(tmp_path / "a.json", {"honest": 0.5, "helpful": 0.4, "mean": 0.45}))
    sweep.write_json(tmp_path / "a_result.json", a)          # sorts mapping keys
    b = {**a, "id": "b", "overrides": {"fusion.top_k": 1}}
    summary = summarize([b, json.loads((tmp_path / "a_result.json").read_text())])
    assert summary["dimensions"] == ["honest", "helpful"]
    assert summary["best"] == "a" and summary["tied_with_best"] == ["b"]
    assert "; tied on dev mean with b" in render_markdown(summary)

"""tools/profiling/rank_choice.py: settings, --set values, commands, timing, table, bad inputs."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tool

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
rc = load_tool("profiling/rank_choice.py")


def test_settings_cover_every_combination_and_fusion_keeps_its_config():
    s = rc.settings_for(["expert", "fusion"], [2, 1], [3, 2], cores=2)
    expert = [(x.ranks, x.threads, x.zero) for x in s if x.stage == "expert"]
    assert expert == [(2, 1, 3), (2, 1, 2), (1, 2, 3), (1, 2, 2)]
    assert [(x.ranks, x.threads, x.zero) for x in s if x.stage == "fusion"] == [(2, 1, None),
                                                                                  (1, 2, None)]


def test_overrides_keep_the_global_batch_and_log_every_step():
    cfg = load_config("tiny")   # expert/fusion: 2 procs x 16 rows
    one = rc.Setting("expert", 1, 2, 2)
    assert rc.overrides(one, cfg, 10) == [
        "expert.num_procs=1", "expert.train.micro_batch_size=32", "expert.train.log_every=1",
        "expert.ds_config=ds_configs/zero2_expert.json", "expert.train.max_steps=10"]
    fusion = rc.overrides(rc.Setting("fusion", 2, 1, None), cfg, 7)
    assert fusion == ["fusion.num_procs=2", "fusion.train.micro_batch_size=16",
                      "fusion.train.log_every=1", "fusion.train.max_steps=7"]
    # the multitask plan fixes its own step count
    assert not [kv for kv in rc.overrides(rc.Setting("multitask", 2, 1, 3), cfg, 7)
                if "max_steps" in kv]
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        rc.scaled_micro(16, 2, 3, "expert.train.micro_batch_size")


def test_launch_argv_and_env_match_h3fusion_run():
    two, one = rc.Setting("expert", 2, 1, 3), rc.Setting("expert", 1, 2, 3)
    cmd = rc.launch_argv(two, "helpful", "c.yaml", "/r", ["a=1"], 1234, python="py")
    assert cmd[:7] == ["py", "-m", "pipeline.commands.launch", "--standalone",
                       "--nproc-per-node=2", "--master-port=1234", "-m"]
    assert cmd[8:] == ["train-expert", "--dimension", "helpful", "--config", "c.yaml",
                       "--run-dir", "/r", "--set", "a=1"]
    assert rc.launch_argv(one, "x", "c", "/r", [], 1, python="py")[:4] == [
        "py", "-m", "pipeline.commands", "train-expert"]
    env2 = rc.launch_env(two, 99, {"PATH": "/bin"}, ["OMP_WAIT_POLICY=PASSIVE"])
    assert env2["OMP_NUM_THREADS"] == "1" and "MASTER_PORT" not in env2
    assert env2["OMP_WAIT_POLICY"] == "PASSIVE"
    env1 = rc.launch_env(one, 99, {})
    assert env1["OMP_NUM_THREADS"] == "2" and env1["MASTER_PORT"] == "99"


def test_timing_excludes_warmup_and_splits_fixed_cost():
    ends = [10.0, 12.0, 12.5, 13.0, 13.5]   # step 2 slow (warm-up), then 0.5 s/step
    assert rc.steady_step_s(ends, skip=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no gap"):
        rc.steady_step_s(ends[:2], skip=1)
    s = rc.launch_summary(t_start=0.0, t_end=15.0, step_times=ends, skip=1)
    assert s["wall_s"] == 15.0 and s["fixed_s"] == pytest.approx(15.0 - 5 * 0.5)
    assert s["before_s"] == pytest.approx(9.5) and s["after_s"] == pytest.approx(1.5)


def test_table_takes_medians_per_setting():
    rows = [{"label": "a", "steps": 5, "steady_s_per_step": v, "wall_s": 10 * v, "fixed_s": 1.0,
             "before_s": 0.5, "after_s": 0.5, "load_before": 1.0, "load_after": 2.0,
             "others_cpu": 0.25, "max_rss_mib": 700.0} for v in (0.1, 0.3, 0.2)]
    text = rc.table(rows)
    assert "| a | 3 | 5 | 0.200 | 5.00 | 2.0 | 1.0 (0.5 + 0.5) | 700 | 0.25, 0.25, 0.25 |" in text
    assert text.count("1.00->2.00") == 3
    busy = rc.table(rows + [{**rows[0], "label": "b", "others_cpu": 0.5}], max_others=0.3)
    assert "| b | 0 (others' CPU share > 0.3 in every launch) |" in busy
    assert "| a | 3 |" in busy


def test_others_share_is_the_machine_time_the_launch_did_not_use():
    # 10 s on 2 cores = 20 CPU s; 14 busy, 9 of them the launch's: others used 5 / 20
    assert rc.others_share(14.0, 9.0, 10.0, 2) == pytest.approx(0.25)
    assert rc.others_share(8.0, 9.0, 10.0, 2) == 0.0   # rounding of the two clocks


def test_expert_ds_configs_of_both_stages_load_and_stage_1_is_refused(tmp_path):
    import json

    from pipeline.backends.deepspeed_engine import load_ds_config

    for stage, path in rc.ZERO_CONFIGS.items():   # what the expert stage accepts: 2 or 3
        assert load_ds_config(REPO / path, require_stage=(2, 3))["zero_optimization"]["stage"] == stage
    bad = tmp_path / "z1.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="stage must be 2 or 3, got 1"):
        load_ds_config(bad, require_stage=(2, 3))


def test_run_measured_counts_descendants(tmp_path):
    import sys

    code = ("import subprocess, sys; x = bytearray(8 * 2**20); "
            "subprocess.run([sys.executable, '-c', 'y = bytearray(96 * 2**20)']); sys.exit(3)")
    status, cpu, rss = rc.run_measured([sys.executable, "-c", code], {}, tmp_path / "log")
    assert status == 3 and cpu > 0 and rss >= 96   # the grandchild's 96 MiB peak


def test_table_from_saved_launches_names_the_run(tmp_path, capsys):
    import json

    row = {"label": "expert 2 rank x 1 thr, ZeRO-3", "steps": 4, "steady_s_per_step": 0.5,
           "wall_s": 9.0, "fixed_s": 7.0, "before_s": 6.0, "after_s": 1.0, "load_before": 0.5,
           "load_after": 0.7, "others_cpu": 0.0}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"run_dir": "/runs/tiny_x", "records": [row]}))
    assert rc.main(["--table-from", str(path)]) == 0
    assert "| tiny_x expert 2 rank x 1 thr, ZeRO-3 | 1 | 4 | 0.500 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rc.parse_args([])   # neither --run-dir nor --table-from


def test_bad_inputs_are_one_error_before_any_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rc, "run_once", lambda *a, **k: pytest.fail("launched"))
    monkeypatch.setattr(rc, "import_cost", lambda *a, **k: pytest.fail("timed imports"))
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "base").mkdir()
    assert rc.main(["--run-dir", str(run), "--stages", "fusion"]) == 2
    assert f"{run / 'fused_init'} (stage fusion)" in capsys.readouterr().err
    assert rc.main(["--run-dir", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert rc.main(["--run-dir", str(run), "--stages", "expert"]) == 2   # no resolved_config.yaml
    assert "config file not found" in capsys.readouterr().err
    tiny = ["--run-dir", str(run), "--config", "tiny", "--stages", "expert"]
    assert rc.main(tiny + ["--ranks", "3", "--cores", "3"]) == 2   # 2 x 16 rows on 3 ranks
    assert "not divisible by 3 ranks" in capsys.readouterr().err
    assert rc.main(tiny + ["--dimension", "kind"]) == 2
    assert "--dimension 'kind': not one of" in capsys.readouterr().err
    for bad in (["--steps", "2"], ["--ranks", "3", "--cores", "2"], ["--env", "FOO"]):
        with pytest.raises(SystemExit) as exit_:
            rc.parse_args(["--run-dir", str(run), *bad])
        assert exit_.value.code == 2

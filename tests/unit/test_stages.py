import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.dimensions import DEFAULT_DIMENSIONS as TASKS
from pipeline.layout import RunLayout
from pipeline.stages import format_stage_table, is_done, pipeline_stages, stage_command


def test_stage_graph_is_a_valid_schedule(tmp_path):
    cfg = load_config("tiny")
    stages = pipeline_stages(cfg, RunLayout.at(tmp_path))
    seen = set()
    for s in stages:
        assert set(s.after) <= seen, f"{s.name} runs before {set(s.after) - seen}"
        seen.add(s.name)
    assert {f"expert_{t}" for t in TASKS} <= seen and {"fuse", "evaluate", "profile"} <= seen
    table = format_stage_table(stages).splitlines()
    assert len(table) == len(stages) and table[0].split("\t")[0] == "data"


def test_distributed_stages_use_torchrun_and_done_means_outputs_exist(tmp_path):
    cfg = load_config("tiny", ["fusion.num_procs=2"])
    run = RunLayout.at(tmp_path)
    fuse = next(s for s in pipeline_stages(cfg, run) if s.name == "fuse")
    cmd = stage_command(fuse, tmp_path / "c.yaml", tmp_path)
    # torchrun through h3fusion's wrapper (signals forwarded, the ranks' 85 kept)
    assert "pipeline.commands.launch" in cmd and "--nproc-per-node=2" in cmd
    assert cmd[cmd.index("pipeline.commands") + 1] == "fuse"
    assert not is_done(fuse)
    run.fused.mkdir()
    assert is_done(fuse)


def test_h3fusion_run_and_the_fusion_sweep_start_a_stage_with_the_same_argv(tmp_path, monkeypatch):
    """One launcher (pipeline.stages.stage_command): the exact argv for 1 and 2 processes, the
    same from `h3fusion run` and from tools/sweep/fusion_sweep.py."""
    import pipeline.stages as stages_module
    from pipeline.commands import run as run_command
    from tests.conftest import load_tool

    sweep = load_tool("sweep/fusion_sweep.py")
    monkeypatch.setattr(stages_module, "free_port", lambda: 4321)
    cfg = load_config("tiny", ["fusion.num_procs=2"])
    stages = {s.name: s for s in pipeline_stages(cfg, RunLayout.at(tmp_path))}
    conf = tmp_path / "c.yaml"
    fuse = [sys.executable, "-m", "pipeline.commands.launch", "--standalone", "--nproc-per-node=2",
            "--master-port=4321", "-m", "pipeline.commands", "fuse", "--config", str(conf),
            "--run-dir", str(tmp_path)]
    data = [sys.executable, "-m", "pipeline.commands", "data", "--config", str(conf),
            "--run-dir", str(tmp_path)]
    for start in (run_command.stage_command, sweep.stage_command):
        assert start(stages["fuse"], conf, tmp_path) == fuse
        assert start(stages["data"], conf, tmp_path) == data
        assert start(stages["build_moe"], conf, tmp_path)[3:] == list(stages["build_moe"].argv)
    assert sweep.eval_argv(conf, tmp_path)[:4] == data[:3] + ["evaluate"]


def test_run_list_stages_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.commands", "run", "--list-stages",
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0].startswith("data\t1\t")


def test_run_refuses_changed_config_on_rerun(tmp_path):
    base = [sys.executable, "-m", "pipeline.commands", "run", "--out", str(tmp_path), "--only", "data"]
    (tmp_path / "resolved_config.yaml").write_text("name: something-else\n")
    proc = subprocess.run(base, capture_output=True, text=True)
    assert proc.returncode == 2 and "different config" in proc.stderr


def test_stage_times_keep_the_last_real_run_of_each_stage(tmp_path):
    import json

    from pipeline.commands.run import _save_stage_times

    run = RunLayout.at(tmp_path)
    _save_stage_times(run, {"data": 1.25, "base": 30.0}, 31.3)
    _save_stage_times(run, {"data": None, "base": 12.0, "fuse": 5.0}, 17.0)   # data skipped
    saved = json.loads((tmp_path / "stage_times.json").read_text())
    assert saved == {"stages_s": {"data": 1.2, "base": 12.0, "fuse": 5.0}, "invocations_s": [31.3, 17.0]}


E2E = Path(__file__).parents[1] / "e2e"
REPO = Path(__file__).parents[2]


def test_expert_stages_and_build_moe_follow_the_configured_dimensions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(E2E))
    cfg = load_config(str(E2E / "four_dimensions.yaml"))
    run = RunLayout.at(tmp_path)
    stages = {s.name: s for s in pipeline_stages(cfg, run)}
    dims = ["helpful", "harmless", "honest", "concise"]
    assert [n for n in stages if n.startswith("expert_")] == [f"expert_{d}" for d in dims]
    assert stages["expert_concise"].argv == ("train-expert", "--dimension", "concise")
    argv = stages["build_moe"].argv
    named = argv[argv.index("--experts") + 1:argv.index("--out")]
    assert list(named) == [f"{d}={run.expert(d)}" for d in dims]
    assert stages["build_moe"].after == tuple(f"expert_{d}" for d in dims) == stages["merge"].after


def test_slurm_array_is_sized_from_the_config():
    """stage_info.py lists the dimensions; pipeline.sh sizes the array from them; no fixed size."""
    env = {**os.environ, "PYTHONPATH": str(E2E)}
    for config, want in (("tiny", list(TASKS)), (str(E2E / "four_dimensions.yaml"), [*TASKS, "concise"])):
        out = subprocess.run([sys.executable, str(REPO / "slurm/stage_info.py"), "dimensions", config],
                             capture_output=True, text=True, env=env, cwd=REPO, check=True)
        assert out.stdout.split() == want
    script = (REPO / "slurm/stage1_experts.sh").read_text()
    assert "\n#SBATCH --array" not in script and "stage_info.py\" dimensions" in script
    assert "--array=\"0-$((${#H3F_DIMS[@]} - 1))\"" in (REPO / "slurm/pipeline.sh").read_text()


def test_ensemble_stage_follows_the_experts_and_precedes_evaluate(tmp_path):
    from pipeline.registry import ENSEMBLES

    cfg = load_config("tiny")
    run = RunLayout.at(tmp_path)
    stages = {s.name: s for s in pipeline_stages(cfg, run)}
    ens = stages["ensemble"]
    assert ens.argv == ("ensemble",) and ens.nprocs == 1 and ens.takes_config
    assert ens.after == tuple(f"expert_{t}" for t in cfg.dimensions)
    assert ens.outputs == tuple(run.ensemble(m) for m in ("avg", "router", "oracle"))
    # one registry: the stage's outputs = what the ensemble stage builds = the CLI's choices
    assert ens.outputs == tuple(run.ensemble(m) for m in ENSEMBLES.names())
    assert "ensemble" in stages["evaluate"].after
    # the cluster script that the table names runs the stage before evaluate
    script = (REPO / "slurm" / ens.slurm_script).read_text()
    assert script.index("h3f_stage ensemble") < script.index("h3f_stage evaluate")

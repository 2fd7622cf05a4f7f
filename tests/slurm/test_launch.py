"""slurm/lib.sh launch wiring on a real 2-node SLURM cluster; bad input fails before srun."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config

from .conftest import CPU_JOB_ARGS, REPO, job_env

pytestmark = pytest.mark.slurm


def _logs(tmp_path: Path) -> tuple[str, ...]:
    return (f"--output={tmp_path}/%x-%j.out", f"--error={tmp_path}/%x-%j.err")


def _read(tmp_path: Path, job_id: str, ext: str) -> str:
    files = list(tmp_path.glob(f"*-{job_id}.{ext}"))
    return files[0].read_text() if files else ""


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("shellcheck missing and cannot apt-get install it")
        subprocess.run(["apt-get", "install", "-y", "-qq", "shellcheck"], check=True,
                       capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("slurm/*.sh"),
                                                        *REPO.glob("tests/slurm/*.sh")])
    assert "slurm/lib.sh" in scripts and "slurm/stage2_fusion.sh" in scripts
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("procs_per_node", [1, 2])
def test_two_node_gloo_allreduce(slurm_cluster, tmp_path, procs_per_node):
    """srun + one torchrun per node + c10d rendezvous: distinct ranks, one process group; the
    step gets the job's --cpus-per-task and --mem (srun >= 22.05 does not inherit the CPUs)."""
    out, run = tmp_path / "probe", tmp_path / "run"
    out.mkdir()
    job = _run_job(  # the later --cpus-per-task wins over CPU_JOB_ARGS' 1
        slurm_cluster, REPO / "tests/slurm/probe_job.sh", *CPU_JOB_ARGS, "--nodes=2",
        "--cpus-per-task=2", "--mem=1500", *_logs(tmp_path),
        env=job_env(H3F_RUN_DIR=str(run), H3F_PROBE_OUT=str(out),
                    H3F_PROCS_PER_NODE=str(procs_per_node)), timeout=300)
    log = _read(tmp_path, job.job_id, "out")
    assert job.returncode == 0, f"{job.stderr}\n{log}\n{_read(tmp_path, job.job_id, 'err')}"
    world = 2 * procs_per_node
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert sorted(r["rank"] for r in records) == list(range(world))
    assert {r["world_size"] for r in records} == {world}
    assert {r["backend"] for r in records} == {"gloo"}
    assert {r["allreduce_sum"] for r in records} == {world * (world + 1) / 2}
    assert {r["slurm_nodeid"] for r in records} == {"0", "1"}  # every node took part
    assert len({r["master"] for r in records}) == 1               # and met at one master
    # The step: srun was given the job's CPUs per task and memory, and SLURM allocated them
    # (2 nodes x 2 CPUs, 2 x 1500 MB); every rank sees the job's CPUs per task.
    assert {r["slurm_cpus_per_task"] for r in records} == {"2"}
    steps = [r for r in records if r["local_rank"] == 0]
    assert len(steps) == 2 and all(r["srun_argv"] for r in steps), steps
    for r in steps:
        assert {"--cpus-per-task=2", "--mem=1500"} <= set(r["srun_argv"]), r["srun_argv"]
        assert r["step_cpus"] == "4" and "mem=3000M" in r["step_tres"].split(","), r
    # Both nodes' output reaches the job log (srun --label prefixes the task id) ...
    for node in (0, 1):
        assert re.search(rf"^{node}: \[default0\]:probe rank=\d+ world={world}", log, re.M), log
    # ... and every rank has its own log file under <run>/slurm/<label>-<job>/ranks/node<N>.
    job_dir = run / "slurm" / f"probe-{job.job_id}"
    rank_logs = sorted(job_dir.glob("ranks/node*/*/attempt_0/*/stdout.log"))
    assert len(rank_logs) == world
    assert all("probe rank=" in p.read_text() for p in rank_logs)
    assert re.fullmatch(r"[0-9a-f]{40}\n", (job_dir / "git_head").read_text())
    assert load_config(str(job_dir / "resolved_config.yaml")).name == "tiny"


def _run_job(slurm_cluster, script: Path, *args: str, env: dict, timeout: float):
    """sbatch, then poll the job each second until it ends (LocalCluster.sbatch); returncode =
    the job's exit code."""
    job = slurm_cluster.sbatch(script, *args, env=env, timeout=timeout)
    assert job.job_id, job.stderr
    return job


def _bad_job(slurm_cluster, tmp_path, env: dict):
    job = _run_job(slurm_cluster, REPO / "slurm/stage2_fusion.sh", *CPU_JOB_ARGS, "--nodes=2",
                   *_logs(tmp_path), env=job_env(**env), timeout=180)
    return job, _read(tmp_path, job.job_id, "out"), _read(tmp_path, job.job_id, "err")


@pytest.mark.parametrize("env, message", [
    ({"H3F_CONFIG": "/nonexistent/h3f.yaml"},
     "H3F_CONFIG=/nonexistent/h3f.yaml: config file not found"),
    ({"H3F_RUN_DIR": "/nonexistent/deeper/run"},
     "H3F_RUN_DIR=/nonexistent/deeper/run: parent directory /nonexistent/deeper does not exist"),
    ({"H3F_GPUS_PER_NODE": "1"},
     "H3F_GPUS_PER_NODE=1 GPUs requested but node node1 has 0 visible"),
    ({"H3F_SET": "fusion.no_such_key=1"}, "unknown config key 'fusion.no_such_key'"),
    ({"H3F_EP": "3"}, "H3F_EP=3 does not divide the world size 2 nodes x 1 procs"),
], ids=["missing-config", "run-dir-parent-missing", "gpus-on-cpu-node", "bad-set", "bad-ep"])
def test_bad_input_fails_fast_with_one_message(slurm_cluster, tmp_path, env, message):
    env = {"H3F_RUN_DIR": str(tmp_path / "run"), **env}
    job, out, err = _bad_job(slurm_cluster, tmp_path, env)
    assert job.returncode == 2, f"{job.stderr}\n{out}\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("h3fusion-slurm: error: "), err
    assert message in lines[0]
    # It stopped before any job step: nothing launched, no rank logs.
    assert "stage " not in out and "[default0]" not in out
    assert not list((tmp_path / "run").glob("slurm/*/ranks"))
    assert slurm_cluster.job_info(job.job_id)["JobState"] == "FAILED"


def test_gpu_mode_with_cpu_only_torch_fails_before_srun(slurm_cluster, tmp_path):
    """GPU mode (nvidia-smi lists a GPU, H3F_GPUS_PER_NODE=1) but torch cannot use CUDA: one
    error naming the cause, before any job step, never a silent CPU run."""
    import torch
    if torch.version.cuda is not None:
        pytest.skip("torch here is a CUDA build; the case needs a CPU-only torch")
    fake = tmp_path / "bin" / "nvidia-smi"   # what nvidia-smi -L prints on a GPU node
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {"H3F_RUN_DIR": str(tmp_path / "run"), "H3F_GPUS_PER_NODE": "1",
           "PATH": f"{fake.parent}:{slurm_cluster.env['PATH']}"}
    job, out, err = _bad_job(slurm_cluster, tmp_path, env)
    assert job.returncode == 2, f"{job.stderr}\n{out}\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("h3fusion-slurm: error: GPU mode"), err
    assert f"torch {torch.__version__} is a CPU-only build" in lines[0]
    assert "stage " not in out and "[default0]" not in out     # no job step ran
    assert not list((tmp_path / "run").glob("slurm/*/ranks"))


def test_gpu_request_on_cpu_cluster_rejected_at_submit(slurm_cluster, tmp_path):
    """The script's own `--gpus-per-node=8` header on nodes without GRES: sbatch refuses."""
    job = slurm_cluster.sbatch(REPO / "slurm/stage2_fusion.sh", "--cpus-per-task=1",
                               *_logs(tmp_path), env=job_env(H3F_RUN_DIR=str(tmp_path / "r")),
                               timeout=60)
    assert job.returncode != 0 and not job.job_id
    assert "Invalid generic resource" in job.stderr


def test_pipeline_submits_afterok_chain(slurm_cluster, tmp_path):
    """slurm/pipeline.sh on the real controller: four jobs (held), each after the previous."""
    run = tmp_path / "run"
    env = job_env(H3F_RUN_DIR=str(run), H3F_GPUS_PER_NODE="0", H3F_NODES="2",
                  H3F_SET="fusion.train.max_steps=7")
    proc = slurm_cluster.run(str(REPO / "slurm/pipeline.sh"), "--hold", "--cpus-per-task=1",
                             env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    try:
        assert len(ids) == 4 and all(i.isdigit() for i in ids), proc.stdout
        infos = [slurm_cluster.job_info(i) for i in ids]
        names = [i["JobName"] for i in infos]
        assert names == ["h3f-prepare", "h3f-experts", "h3f-fusion", "h3f-eval"]
        nodes = [i["NumNodes"].split("-")[0] for i in infos]  # pending: "2-2"
        assert infos[1]["ArrayTaskId"] == "0-2" and nodes == ["1", "2", "2", "1"]
        for prev, info in zip(ids, infos[1:]):
            assert info["Dependency"].startswith(f"afterok:{prev}"), info["Dependency"]
        assert all(i["JobState"] == "PENDING" for i in infos)
        assert load_config(str(run / "resolved_config.yaml")).fusion.train.max_steps == 7
    finally:
        slurm_cluster.run("scancel", *ids, check=False)
    # A second submission into the same run dir with a different config is refused.
    again = slurm_cluster.run(str(REPO / "slurm/pipeline.sh"), "--hold", env={**env, "H3F_SET": ""},
                              timeout=120, check=False)
    assert again.returncode == 2 and "holds a different config" in again.stderr


def test_pipeline_sizes_the_expert_array_from_the_config(slurm_cluster, tmp_path):
    """A 4-dimension config (tests/e2e/four_dimensions.yaml) gets a 4-task expert array."""
    env = job_env(H3F_RUN_DIR=str(tmp_path / "run"), H3F_GPUS_PER_NODE="0",
                  H3F_CONFIG=str(REPO / "tests/e2e/four_dimensions.yaml"),
                  PYTHONPATH=str(REPO / "tests/e2e"))
    proc = slurm_cluster.run(str(REPO / "slurm/pipeline.sh"), "--hold", "--cpus-per-task=1",
                             env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    try:
        assert slurm_cluster.job_info(ids[1])["ArrayTaskId"] == "0-3"
    finally:
        slurm_cluster.run("scancel", *ids, check=False)

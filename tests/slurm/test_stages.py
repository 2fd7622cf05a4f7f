"""The stage scripts on a real 2-node SLURM cluster, on the tiny preset made smaller.

One module fixture prepares a run dir through the scripts themselves: stage 0 (data, tokenizer,
base) and stage 1 for one dimension (a 2-node ZeRO-3 expert); the other two experts are copies
of the base (enough for build_moe; expert training itself is tested in tests/dist). Then
stage 2 runs on both nodes, once straight through and once interrupted by USR1 + requeue.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.layout import RunLayout

from .conftest import CPU_JOB_ARGS, REPO, job_env

pytestmark = pytest.mark.slurm

SMALL = ["data.builtin.train_per_task=40", "data.builtin.dev_per_task=8",
         "data.builtin.test_per_task=8", "tokenizer.vocab_size=384",
         "base.tiny.hidden_size=32", "base.tiny.intermediate_size=64",
         "base.tiny.num_hidden_layers=2", "base.tiny.num_attention_heads=2",
         "base.tiny.num_key_value_heads=2", "base.tiny.max_position_embeddings=128",
         "base.train.max_steps=3", "base.train.max_seq_len=64",
         "expert.train.max_steps=2", "expert.train.micro_batch_size=4",
         "expert.train.max_seq_len=64", "fusion.train.micro_batch_size=4",
         "fusion.train.max_seq_len=64", "fusion.train.log_every=1"]


def _logs(d: Path) -> tuple[str, ...]:
    return (f"--output={d}/%x-%j.out", f"--error={d}/%x-%j.err")


def _job_text(d: Path, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted(d.glob(f"*{job_id}*.*")))


def _rank_logs(run: Path, label: str, job_id: str) -> dict[int, str]:
    """node id -> everything its ranks wrote (all attempts and restarts)."""
    base = run / "slurm" / f"{label}-{job_id}" / "ranks"
    return {int(n.name[4:]): "".join(p.read_text() for p in sorted(n.glob("*/attempt_*/*/std*.log")))
            for n in sorted(base.glob("node*"))}


@pytest.fixture(scope="module")
def prepared_run(slurm_cluster, tmp_path_factory):
    """<root>/run with data, tokenizer, base and three experts; jobs' logs in <root>/logs."""
    root = tmp_path_factory.mktemp("h3f-slurm-run")
    run, logs = root / "run", root / "logs"
    logs.mkdir()
    config = root / "small.yaml"
    subprocess.run([sys.executable, str(REPO / "slurm/stage_info.py"), "resolve", "tiny", str(config),
                    *SMALL], check=True, cwd=REPO, timeout=120)
    env = job_env(H3F_CONFIG=str(config), H3F_RUN_DIR=str(run))
    prep = slurm_cluster.sbatch(REPO / "slurm/stage0_prepare.sh", *CPU_JOB_ARGS, *_logs(logs),
                                env=env, timeout=900)
    assert prep.returncode == 0, _job_text(logs, prep.job_id)
    expert = slurm_cluster.sbatch(REPO / "slurm/stage1_experts.sh", *CPU_JOB_ARGS, "--array=0",
                                  "--nodes=2", f"--output={logs}/%x-%A_%a.out",
                                  f"--error={logs}/%x-%A_%a.err", env=env, timeout=900)
    assert expert.returncode == 0, _job_text(logs, expert.job_id)
    layout = RunLayout.at(run)
    for task in ("harmless", "honest"):
        shutil.copytree(layout.base, layout.expert(task))
    return {"root": root, "run": run, "logs": logs, "config": config, "env": env,
            "prep": prep, "expert": expert}


def test_stage0_and_stage1_outputs(prepared_run, slurm_cluster):
    layout = RunLayout.at(prepared_run["run"])
    for path in (layout.data, layout.tokenizer, layout.base, layout.expert("helpful")):
        assert path.is_dir(), path
    text = _job_text(prepared_run["logs"], prepared_run["expert"].job_id)
    assert "stage expert_helpful: h3fusion train-expert --dimension helpful" in text, text
    info = slurm_cluster.job_info(prepared_run["expert"].job_id)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2"


def _copy_run(prepared_run, dest: Path) -> Path:
    """A fresh copy of the prepared run (data, tokenizer, base, experts; no fused_init)."""
    run = dest / "run"
    shutil.copytree(prepared_run["run"], run,
                    ignore=shutil.ignore_patterns("slurm", "tensorboard", ".lock*"))
    return run


def test_stage2_fusion_two_nodes(prepared_run, slurm_cluster, tmp_path):
    run = _copy_run(prepared_run, tmp_path)
    env = {**prepared_run["env"], "H3F_RUN_DIR": str(run),
           "H3F_SET": "fusion.train.max_steps=6 fusion.lambda_gate=0.05"}
    job = slurm_cluster.sbatch(REPO / "slurm/stage2_fusion.sh", *CPU_JOB_ARGS, "--nodes=2",
                               *_logs(tmp_path), env=env, timeout=900)
    text = _job_text(tmp_path, job.job_id)
    assert job.returncode == 0, text
    assert slurm_cluster.job_info(job.job_id)["JobState"] == "COMPLETED"
    layout = RunLayout.at(run)
    assert layout.fused_init.is_dir() and layout.fused.is_dir()  # build_moe ran, then fuse
    ranks = _rank_logs(run, "fusion", job.job_id)
    assert set(ranks) == {0, 1} and all(ranks.values())           # both ranks logged
    assert re.search(r"^0: \[default0\]:", text, re.M) and re.search(r"^1: \[default0\]:", text, re.M)
    resolved = load_config(str(run / "slurm" / f"fusion-{job.job_id}" / "resolved_config.yaml"))
    assert resolved.fusion.train.max_steps == 6 and resolved.fusion.lambda_gate == 0.05
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(layout.fused)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 9, 3]]))
    assert out.logits.shape[:2] == (1, 4) and torch.isfinite(out.logits).all()


def _fusion_step(ranks_text: str) -> int:
    steps = [int(m) for m in re.findall(r"fuse:\s+\d+%\|[^|]*\| (\d+)/", ranks_text)]
    return max(steps, default=0)


def test_stage2_preempted_requeued_and_resumed(prepared_run, slurm_cluster, tmp_path):
    run = _copy_run(prepared_run, tmp_path)
    steps = 150
    env = {**prepared_run["env"], "H3F_RUN_DIR": str(run),
           "H3F_SET": f"fusion.train.max_steps={steps}"}
    job = slurm_cluster.sbatch(REPO / "slurm/stage2_fusion.sh", *CPU_JOB_ARGS, "--nodes=2",
                               *_logs(tmp_path), env=env, wait=False, timeout=60)
    assert job.returncode == 0 and job.job_id, job.stderr
    deadline = time.time() + 400
    while _fusion_step("".join(_rank_logs(run, "fusion", job.job_id).values())) < 3:
        assert time.time() < deadline, _job_text(tmp_path, job.job_id)
        assert slurm_cluster.job_info(job.job_id)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(1)
    # What --signal=B:USR1@120 does ahead of the time limit, sent now.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.job_id)
    info = slurm_cluster.wait_finished(job.job_id, timeout=900)
    text = _job_text(tmp_path, job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text}"
    assert "requeueing job" in text and re.search(r"h3fusion fuse .*--resume", text), text
    per_node = _rank_logs(run, "fusion", job.job_id)
    assert set(per_node) == {0, 1}
    for node, log in per_node.items():  # every rank checkpointed on USR1, then resumed there
        saved = re.findall(r"stop signal SIGUSR1: checkpoint step0*(\d+) saved", log)
        resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
        assert len(saved) == 1 and resumed == saved, f"node {node}:\n{log[-3000:]}"
        assert 0 < int(saved[0]) < steps
    manifest = (RunLayout.at(run).fused / "fusion_train_manifest.json").read_text()
    assert re.search(rf'"steps": {steps}\b', manifest), manifest
    assert "SignalException" not in text, text   # the launcher exited 85, not torchrun's 1
    # the same job uninterrupted ends with the same weights (issue 17: <= 1e-6)
    full, full_logs = _copy_run(prepared_run, tmp_path / "full"), tmp_path / "full_logs"
    full_logs.mkdir()
    straight = slurm_cluster.sbatch(REPO / "slurm/stage2_fusion.sh", *CPU_JOB_ARGS, "--nodes=2",
                                    *_logs(full_logs), env={**env, "H3F_RUN_DIR": str(full)},
                                    timeout=900)
    assert straight.returncode == 0, _job_text(full_logs, straight.job_id)
    import torch
    from safetensors.torch import load_file
    weights = [{k: v for f in sorted(RunLayout.at(r).fused.glob("*.safetensors"))
                for k, v in load_file(str(f)).items()} for r in (full, run)]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=1e-6, rtol=0, msg=k)

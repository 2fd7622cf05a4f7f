"""`h3fusion run` under kill -9 and stop signals, with real processes (2 gloo ranks of stage 2):

- kill -9 of `h3fusion run` while `fuse` trains: torchrun and both ranks die within seconds
  (parent-death signal), and the run-dir lock meanwhile makes a second `h3fusion run` on the same
  run dir fail at once with exit 2, naming the holder's pid;
- SIGUSR1 to `h3fusion run` during `fuse`: the ranks checkpoint, `h3fusion run` exits 85 (the
  requeue status slurm/lib.sh acts on), and rerunning the same command resumes and finishes with
  final weights equal (<= 1e-6) to an uninterrupted run.

The run dir holds only what `fuse` needs: a small `data` + `tokenizer` (run by `h3fusion run`
itself) and a random tiny fused MoE as `fused_init`; every invocation is `--only fuse`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_fuse_support import load_weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]
H3FUSION = [sys.executable, "-m", "pipeline.commands", "run", "--config", "tiny"]
DIMS = ["helpful", "harmless", "honest"]
SETTINGS = ["data.builtin.train_per_task=40", "data.builtin.dev_per_task=4",
            "data.builtin.test_per_task=4", "data.builtin.pretrain_per_task=40",
            "tokenizer.vocab_size=512", "fusion.train.micro_batch_size=2",
            "fusion.train.max_seq_len=64", "fusion.train.max_steps=150", "fusion.train.save_every=4",
            "fusion.train.warmup_steps=2", "fusion.train.log_every=1"]


def h3fusion_run(run_dir: Path, *extra: str, settings=SETTINGS) -> list[str]:
    return H3FUSION + ["--run-dir", str(run_dir)] + [a for s in settings for a in ("--set", s)] \
        + list(extra)


def start(run_dir: Path, log: Path, settings=SETTINGS) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    with open(log, "ab") as out:
        return subprocess.Popen(h3fusion_run(run_dir, "--only", "fuse", settings=settings),
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run dir with data, tokenizer and a random fused_init (every other stage skipped)."""
    root = tmp_path_factory.mktemp("launch") / "prepared"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(h3fusion_run(root, "--only", "data", "tokenizer"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    build_fused_init(root / "fused_init")
    return root


def build_fused_init(out: Path) -> None:
    """A random tiny H3Fusion MoE over the run's 512-token vocabulary; zero routers."""
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM

    cfg = H3FusionConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         num_experts=3, top_k=2, expert_names=DIMS, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = H3FusionForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.zero_()
    model.save_pretrained(out, safe_serialization=True)


def copy_run(prepared: Path, dest: Path) -> Path:
    """A fresh run dir with the prepared stages; without resolved_config.yaml, so a test may use
    other fusion settings (data and tokenizer are done and never rerun)."""
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns(".lock*", "resolved_config.yaml"))
    return dest


def test_kill9_of_launcher_leaves_no_rank_and_lock_rejects_second_writer(prepared, tmp_path):
    run_dir, log = copy_run(prepared, tmp_path / "run"), tmp_path / "run.log"
    endless = [s for s in SETTINGS if "max_steps" not in s] + ["fusion.train.max_steps=1000000"]
    proc = start(run_dir, log, endless)   # killed long before its end
    try:
        wait_for(lambda: (run_dir / "fused_ds" / "latest").is_file(), 600, "a checkpoint", proc, log)
        second = subprocess.run(h3fusion_run(run_dir, "--only", "fuse", settings=endless),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by pid {proc.pid}" in second.stderr, second.stderr[-2000:]
        descendants = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in descendants if "fuse" in " ".join(p.cmdline())
                 and "pipeline.commands.launch" not in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in descendants]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        end = time.time() + 10
        while alive(descendants) and time.time() < end:
            time.sleep(0.2)
        assert alive(descendants) == [], [p.cmdline() for p in alive(descendants)]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "fused").exists()
    # the lock died with its holder: a rerun gets the run dir (and resumes from the checkpoint)


def test_sigusr1_to_launcher_checkpoints_exits_85_and_resumes_to_equal_weights(prepared, tmp_path):
    full_dir = copy_run(prepared, tmp_path / "full")
    proc = start(full_dir, tmp_path / "full.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "full.log").read_text()[-3000:]

    run_dir, log = copy_run(prepared, tmp_path / "run"), tmp_path / "run.log"
    proc = start(run_dir, log)
    wait_for(lambda: (run_dir / "fused_ds" / "latest").is_file(), 600, "a checkpoint", proc, log)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 85, log.read_text()[-3000:]
    text = log.read_text()
    assert "stage fuse stopped by SIGUSR1 after saving a checkpoint (exit 85)" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    tag = (run_dir / "fused_ds" / "latest").read_text().strip()
    assert tag != "step0000150" and (run_dir / "fused_ds" / tag).is_dir()
    assert not (run_dir / "fused").exists()

    proc = start(run_dir, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert f"resumed from {run_dir / 'fused_ds'}/{tag}" in log.read_text()
    full, resumed = load_weights(full_dir / "fused"), load_weights(run_dir / "fused")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=0, msg=k)


def test_stage1_sigusr1_through_the_launcher_exits_85_logs_and_resumes(tmp_path_factory, tmp_path):
    """Stage 1 under the same launcher `h3fusion run` and slurm/lib.sh use: SIGUSR1 to it ->
    both ranks checkpoint, the launcher exits 85 (torchrun alone: 1), stage 1 logs the stop and,
    rerun, its resume; the final expert equals an uninterrupted run."""
    from test_train_expert import TRAIN_SETS
    from test_train_expert_fixtures import (dist_env_vars, new_run_dir, run_expert, tiny_run,
                                            train_expert_cmd)
    from test_train_expert_fixtures import load_weights as load_expert

    sets = TRAIN_SETS + ["train.max_steps=40", "train.save_every=4"]

    def launched(run: Path, *extra: str) -> list[str]:   # torchrun -> pipeline.commands.launch
        cmd = train_expert_cmd(run, "helpful", sets, extra)
        return cmd[:2] + ["pipeline.commands.launch"] + cmd[3:]

    reference = run_expert(tmp_path_factory, "launch_ref", "helpful", sets)
    run, log = new_run_dir(tmp_path_factory, "launch_sig", tiny_run(tmp_path_factory)), tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(launched(run), env=dist_env_vars(), stdout=out, stderr=subprocess.STDOUT)
    latest = run / "experts_ds" / "helpful" / "latest"
    try:
        wait_for(latest.is_file, 600, "a checkpoint", proc, log)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == 85, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text, tag = log.read_text(), latest.read_text().strip()
    assert f"expert helpful: stop signal SIGUSR1: checkpoint {run}/experts_ds/helpful/{tag} saved" \
        in text, text[-3000:]
    assert "exiting with 85" in text and "SignalException" not in text, text[-3000:]
    assert not (run / "experts" / "helpful").exists() and tag != "step0000040"

    resumed = subprocess.run(launched(run), env=dist_env_vars(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"expert helpful: resumed from {run}/experts_ds/helpful/{tag}" in resumed.stderr
    want, got = load_expert(reference / "experts" / "helpful"), load_expert(run / "experts" / "helpful")
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)

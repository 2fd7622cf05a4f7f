"""Resume: a 2-process ZeRO-3 run killed with SIGKILL after a checkpoint, then `--resume`d,
ends with the same weights as the uninterrupted run (fp32, same seed)."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

from pipeline.io_utils import read_json
from test_train_expert import FFN_SETS
from test_train_expert_fixtures import (REPO, dist_env_vars, load_weights, new_run_dir, run_expert,
                                        tiny_run, train_expert_cmd)

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (torchrun starts them in their own sessions, so killing
    its process group alone would leave them running)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _kill_after_first_checkpoint(cmd: list[str], latest, log_path, timeout: float = 400) -> str:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=dist_env_vars(), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not latest.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        _kill_tree(proc.pid)
        proc.wait()
    assert latest.is_file(), f"no checkpoint before the kill; log:\n{open(log_path).read()[-4000:]}"
    return latest.read_text()


def test_sigkill_then_resume_matches_uninterrupted(tmp_path_factory, tmp_path):
    reference = run_expert(tmp_path_factory, "ffn", "helpful", FFN_SETS)
    run = new_run_dir(tmp_path_factory, "killed", tiny_run(tmp_path_factory))
    cmd = train_expert_cmd(run, "helpful", FFN_SETS)
    killed_at = _kill_after_first_checkpoint(cmd, run / "experts_ds" / "helpful" / "latest",
                                             tmp_path / "killed.log")
    assert not (run / "experts" / "helpful").exists(), "the run finished before it was killed"
    resumed = subprocess.run(train_expert_cmd(run, "helpful", FFN_SETS, ("--resume",)),
                             env=dist_env_vars(), cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    manifest = read_json(run / "experts" / "helpful" / "manifest.json")
    assert manifest["resumed_from"] == killed_at and int(killed_at[4:]) < 12
    assert manifest["steps"] == 12
    want = load_weights(reference / "experts" / "helpful")
    got = load_weights(run / "experts" / "helpful")
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    ref_hist = read_json(reference / "experts" / "helpful" / "manifest.json")["history"]
    assert [h["step"] for h in manifest["history"]] == list(range(1, 13))
    assert manifest["history"][-1]["train/loss"] == pytest.approx(ref_hist[-1]["train/loss"], abs=1e-6)

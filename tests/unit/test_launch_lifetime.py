"""Process lifetime and exclusivity, with real processes: the parent-death signal
(train/signals.die_with_parent), the run-dir lock (pipeline/run_lock.py, through `h3fusion`), and
the torchrun wrapper's exit status (pipeline/commands/launch.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.commands.launch import requeue_status, torchrun_argv
from pipeline.run_lock import RunDirBusyError, run_dir_lock

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _gone(pid: int, timeout: float = 10) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_child_with_die_with_parent_dies_with_a_kill9_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    # parent -> child in its own session (as torchrun starts ranks), child asks for SIGKILL
    child = ("import os, time\nfrom pipeline.train.signals import die_with_parent\n"
             f"die_with_parent()\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
             "time.sleep(120)\n")
    parent = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], env=ENV)
    try:
        end = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < end, "child did not start"
            time.sleep(0.1)
        child_pid = int(pid_file.read_text())
        assert not _gone(child_pid, timeout=0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _gone(child_pid), "the child outlived its SIGKILLed parent"
    finally:
        proc.kill()


def _hold_lock(run_dir: Path, stage: str | None, ready: Path) -> subprocess.Popen:
    code = ("import sys, time\nsys.argv = ['h3fusion', 'holder-cmd']\n"
            "from pipeline.run_lock import run_dir_lock\n"
            f"with run_dir_lock({str(run_dir)!r}, stage={stage!r}):\n"
            f"    open({str(ready)!r}, 'w').write('x')\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    end = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < end, "lock holder did not start"
        time.sleep(0.05)
    return proc


def test_second_h3fusion_run_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir, None, tmp_path / "ready")
    try:
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "pipeline.commands", "run", "--run-dir",
                                 str(run_dir)], env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert time.time() - t0 < 60
        line = second.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert f"run dir {run_dir} is in use by pid {holder.pid} on host" in line, line
        assert "`h3fusion holder-cmd`" in line and f"lock: {run_dir}/.lock" in line, line
        # a stage command (shared run lock) is refused too
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            with run_dir_lock(run_dir, stage="fuse"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # kill -9 released the flock: the run dir is free again, the stale file blocks nothing
    with run_dir_lock(run_dir) as path:
        assert path == run_dir / ".lock"


def test_stage_locks_let_different_stages_share_the_run_dir_but_not_the_same(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir, "train-expert-helpful", tmp_path / "ready")
    try:
        with run_dir_lock(run_dir, stage="train-expert-honest"):   # a SLURM array sibling
            pass
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}.*holder-cmd"):
            with run_dir_lock(run_dir, stage="train-expert-helpful"):
                pass
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            with run_dir_lock(run_dir):                            # `h3fusion run`
                pass
    finally:
        holder.kill()
        holder.wait()


def test_inherited_lock_is_not_taken_again(tmp_path):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir) as held:
        with run_dir_lock(run_dir, inherited=str(held), stage="fuse") as inner:
            assert inner is None
        with pytest.raises(RunDirBusyError):    # without the inheritance it would conflict
            with run_dir_lock(run_dir, inherited=str(tmp_path / "elsewhere" / ".lock")):
                pass


def test_requeue_status_and_torchrun_options():
    assert requeue_status({0: 85, 1: 85}) == 85
    assert requeue_status({0: 85, 1: 0}) == 85
    assert requeue_status({0: 85, 1: 2}) is None
    assert requeue_status({}) is None and requeue_status({0: 0}) is None
    argv = torchrun_argv(["--signals-to-handle=SIGTERM", "-m", "x"])
    assert argv[0].endswith("SIGUSR1") and argv[2] == "--signals-to-handle=SIGTERM"


def test_launcher_passes_a_rank_failure_status_through_in_one_line(tmp_path):
    """torchrun alone exits 1 with a ChildFailedError report; the wrapper exits with the ranks'
    own status (2: a clear input error) and says so in one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.commands.launch", "--standalone", "--nproc-per-node=2",
         "-m", "pipeline.commands", "fuse", "--config", str(tmp_path / "missing.yaml"),
         "--run-dir", str(tmp_path / "run")],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "h3fusion launch: rank " in proc.stderr and "exiting with 2" in proc.stderr, proc.stderr
    assert "missing.yaml" in proc.stderr

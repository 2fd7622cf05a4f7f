"""Session fixture: a real SLURM cluster on this host (tests/slurm/local_cluster.sh).

munged + slurmctld + two slurmd daemons emulating `node1` and `node2`, on loopback, with a fresh
state dir and free ports; stopped (by PID) at the end of the session.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLUSTER_SCRIPT = HERE / "local_cluster.sh"
# The test nodes are CPU-only with 2 CPUs each: every job overrides the GPU/CPU headers.
CPU_JOB_ARGS = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=15")


def _skip_reason() -> str | None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and this user cannot apt-get install them"
    return None


def _free_port_block(count: int = 3) -> int:
    """First port of `count` consecutive free loopback ports (slurmctld, node1, node2)."""
    for _ in range(50):
        base = 17000 + (os.getpid() * 7 + int(time.time() * 1000)) % 2000
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            time.sleep(0.05)
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports for the local SLURM cluster")


@dataclass
class Job:
    job_id: str
    returncode: int          # sbatch's own status (with --wait: the job's exit status)
    stdout: str
    stderr: str


@dataclass
class LocalCluster:
    env: dict
    state: Path

    def run(self, *cmd: str, timeout: float = 60, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=REPO, text=True,
                              capture_output=True, timeout=timeout, check=check)

    def sbatch(self, script: str | Path, *args: str, env: dict | None = None,
               wait: bool = True, timeout: float = 600) -> Job:
        """Submit; with `wait`, poll the job each second until it ends and return its exit code
        as `returncode` (what `sbatch --wait` returns, but `sbatch --wait` polls at growing
        intervals and sees a finished job up to ~40 s late)."""
        cmd = ["sbatch", "--parsable", *args, str(script)]
        proc = self.run(*cmd, timeout=60, check=False, env=env)
        match = re.search(r"^(\d+)", proc.stdout.strip())
        job = Job(match.group(1) if match else "", proc.returncode, proc.stdout, proc.stderr)
        if wait and job.returncode == 0 and job.job_id:
            code, sig = self.wait_finished(job.job_id, timeout)["ExitCode"].split(":")
            job.returncode = int(code) or (128 + int(sig) if int(sig) else 0)
        return job

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        end = time.time() + timeout
        while time.time() < end:
            info = self.job_info(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                        "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {self.job_info(job_id)}")


def job_env(**extra: str) -> dict:
    """Environment for a test job: the venv's tools, one thread per process, CPU DeepSpeed."""
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "H3F_REPO": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's 0700 tmp dirs: munged runs as the munge user and must reach its dir.
    state = Path(tempfile.mkdtemp(prefix="h3f-slurm-", dir="/tmp"))
    state.chmod(0o755)
    env = {**os.environ, "H3F_SLURM_STATE": str(state),
           "H3F_SLURM_PORT_BASE": str(_free_port_block())}
    started = subprocess.run([str(CLUSTER_SCRIPT), "start"], env=env, text=True,
                             capture_output=True, timeout=900)
    if started.returncode != 0:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], env=env, timeout=120)
        pytest.fail(f"local SLURM cluster did not start:\n{started.stderr}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield LocalCluster(env=env, state=state)
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)

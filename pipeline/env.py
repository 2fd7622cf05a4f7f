"""The one module that reads launcher / SLURM environment variables.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under `srun`
without a launcher only SLURM_* exist. Everything else asks this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int(name: str, fallback: str | None, default: int) -> int:
    raw = os.environ.get(name, os.environ.get(fallback, "") if fallback else "")
    return int(raw) if raw.strip() else default


def dist_env() -> DistEnv:
    """Rank/world from torchrun's variables, else from SLURM's, else a single process."""
    return DistEnv(
        rank=_int("RANK", "SLURM_PROCID", 0),
        world_size=_int("WORLD_SIZE", "SLURM_NTASKS", 1),
        local_rank=_int("LOCAL_RANK", "SLURM_LOCALID", 0),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int("MASTER_PORT", None, 29500),
    )


def export_dist_env(env: DistEnv) -> None:
    """Make torch.distributed's env:// init see `env` (for launcher-less SLURM tasks)."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))


def accelerator_kind() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (sets DS_ACCELERATOR for DeepSpeed)."""
    import torch
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", kind)
    return kind


def dist_backend() -> str:
    return "nccl" if accelerator_kind() == "cuda" else "gloo"


def requeue_requested_exit_code() -> int:
    """Exit status a trainer uses after a signal-triggered checkpoint; slurm/ scripts requeue on it."""
    return int(os.environ.get("H3F_REQUEUE_EXIT_CODE", "85"))


# ----------------------------------------------------------------------------- launch / lifetime
# Set by pipeline.commands.launch (the torchrun wrapper) for its ranks: each rank writes its exit
# status there, because torchrun itself exits 1 after forwarding a signal (the 85 would be lost).
EXIT_STATUS_DIR = "H3F_EXIT_STATUS_DIR"
# Set by `h3fusion run` for the stages it starts: the run-dir lock file it holds (see run_lock).
RUN_LOCK_HELD = "H3F_RUN_LOCK_HELD"


def exit_status_dir() -> str | None:
    return os.environ.get(EXIT_STATUS_DIR) or None


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (torch.distributed.elastic) started."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def inherited_run_lock() -> str | None:
    """The lock file a parent `h3fusion run` holds for this process's run dir, if any."""
    return os.environ.get(RUN_LOCK_HELD) or None


def export_run_lock(path: str | None) -> None:
    """Tell this process's children that it holds the run-dir lock `path` (None: no longer)."""
    if path is None:
        os.environ.pop(RUN_LOCK_HELD, None)
    else:
        os.environ[RUN_LOCK_HELD] = path


def shutdown_timeout() -> int:
    """Seconds torchrun gives its workers to checkpoint and exit after a forwarded signal."""
    return int(os.environ.get("H3F_SHUTDOWN_TIMEOUT", "100"))

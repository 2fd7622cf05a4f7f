"""The one module that reads launcher / SLURM environment variables.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under `srun`
without a launcher only SLURM_* exist. Everything else asks this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


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


# ----------------------------------------------------------------------------- device mode
# Set by slurm/lib.sh: "cuda" in GPU mode, "cpu" in CPU mode; unset (or "auto"): whatever torch sees.
DEVICE = "H3F_DEVICE"


class CudaUnavailableError(ValueError):
    """CUDA was asked for (H3F_DEVICE=cuda, or a config setting that runs only on GPUs) but
    torch cannot use it. A ValueError, so every command reports it as bad input (exit 2)."""


def requested_device() -> Optional[str]:
    """'cuda' or 'cpu' when H3F_DEVICE pins the device, None for auto."""
    raw = os.environ.get(DEVICE, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in ("cuda", "cpu"):
        raise ValueError(f"{DEVICE}={raw!r}: expected cuda, cpu or auto")
    return raw


def _cuda_init_error(torch) -> str:
    """torch's own words for why CUDA does not initialise ("Found no NVIDIA driver ...", "The
    NVIDIA driver on your system is too old ...")."""
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 (any init failure is the diagnosis)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"torch.cuda.device_count() is {torch.cuda.device_count()}"


def cuda_unavailable_reason() -> Optional[str]:
    """Why torch cannot use a CUDA GPU in this process (None when it can): a CPU-only torch
    build, CUDA_VISIBLE_DEVICES hiding the GPUs, or an NVIDIA driver that is missing or too old
    for the CUDA version torch was built with."""
    import torch
    if torch.cuda.is_available():
        return None
    built_for = torch.version.cuda or getattr(torch.version, "hip", None)
    if not built_for:
        return (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): "
                f"install a CUDA build of torch (README, GPU install)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles")
    error = "" if hidden else _cuda_init_error(torch)
    if hidden or (visible is not None and "no cuda gpus are available" in error.lower()):
        return (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process"
                f"{f' ({error})' if error else ''}: unset it, or let SLURM set it "
                f"(--gpus-per-node)")
    return (f"torch {torch.__version__} is built for CUDA {built_for}, but no GPU is usable "
            f"({error}): the NVIDIA driver is missing or older than CUDA {built_for} needs; "
            f"`nvidia-smi` shows the driver's CUDA version, which must be >= {built_for}, else "
            f"install a torch built for an older CUDA (README, GPU install)")


def require_cuda(why: str, min_devices: int = 1) -> None:
    """Raise CudaUnavailableError, naming `why` CUDA is needed and why torch cannot use it,
    unless this process sees at least `min_devices` GPUs."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise CudaUnavailableError(f"{why} needs CUDA, but torch cannot use it: {reason}")
    import torch
    count = torch.cuda.device_count()
    if count < min_devices:
        raise CudaUnavailableError(
            f"{why} needs {min_devices} GPUs (one per process), but torch sees {count} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def check_requested_device() -> None:
    """At a command's start: with H3F_DEVICE=cuda, the one clear error now (before any work)
    when torch cannot use CUDA. Imports torch only when H3F_DEVICE is set."""
    if requested_device() is not None:
        accelerator_kind()


def accelerator_kind() -> str:
    """'cuda' or 'cpu', and DeepSpeed's DS_ACCELERATOR to match. H3F_DEVICE=cuda insists on
    CUDA (never a silent CPU fallback) and H3F_DEVICE=cpu keeps the CPU even where a GPU is
    visible: both override a stale DS_ACCELERATOR. Unset: CUDA when torch sees a GPU, and an
    existing DS_ACCELERATOR is left alone."""
    wanted = requested_device()
    if wanted == "cuda":
        require_cuda(f"{DEVICE}=cuda (GPU mode, set by slurm/lib.sh)")
    if wanted is not None:
        os.environ["DS_ACCELERATOR"] = wanted
        return wanted
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


# ----------------------------------------------------------------------------- Hugging Face Hub
# huggingface_hub and datasets read these themselves when they are imported; pipeline.checkpoint.hub reads
# them here, at call time, to choose the cache it looks in and whether it may go online.
_TRUE_VALUES = ("1", "ON", "YES", "TRUE")


def hf_hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) set to a true value."""
    raw = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return raw.strip().upper() in _TRUE_VALUES


def hf_hub_cache() -> str | None:
    """The hub cache dir the environment names: HF_HUB_CACHE (or HUGGINGFACE_HUB_CACHE), else
    HF_HOME/hub; None = huggingface_hub's default (~/.cache/huggingface/hub)."""
    named = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if named:
        return os.path.expanduser(named)
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expanduser(home), "hub") if home else None


# ----------------------------------------------------------------------------- GPU checks
# tests/gpu (and tools/gpu/check.sh) set it: the GPU backends named here must run, so a test of
# one that cannot (package missing, compiled ops missing, torch too old, GPU too old) FAILS
# instead of skipping. Unset (the default), such tests skip with the reason.
REQUIRE_GPU_BACKENDS = "H3F_REQUIRE_GPU_BACKENDS"


def required_gpu_backends() -> frozenset[str]:
    """Names in H3F_REQUIRE_GPU_BACKENDS (comma separated, e.g. "megablocks,grouped_mm")."""
    raw = os.environ.get(REQUIRE_GPU_BACKENDS, "")
    return frozenset(name.strip().lower() for name in raw.split(",") if name.strip())


def stage_process_env(nprocs: int, pythonpath_first: Optional[str] = None) -> dict[str, str]:
    """The environment a local stage process starts with: this process's, plus (unless set)
    OMP_NUM_THREADS = cores / nprocs (oversubscribed OpenMP threads make multi-process CPU
    training crawl) and TOKENIZERS_PARALLELISM=false; `pythonpath_first` goes ahead on PYTHONPATH."""
    env = dict(os.environ)
    if pythonpath_first:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath_first, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nprocs))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it), for a local rendezvous (MASTER_PORT,
    torchrun --master-port); another process may take it before it is bound again."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

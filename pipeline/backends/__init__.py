"""Optional heavy backends (DeepSpeed, MegaBlocks) and what they need from the machine. The only
package allowed to import them; every import happens lazily inside a function so
`import pipeline.backends` stays cheap."""
from __future__ import annotations

import importlib
import importlib.util
import re

# The lowest torch the pinned dependency sets allow: requirements-gpu-megablocks.txt pins torch
# 2.7.0 (MegaBlocks 0.10.0 needs exactly that); requirements-gpu-torch.txt and
# requirements-cpu.txt pin a current torch. setup.py's floor is the same
# (tests/unit/test_install_sets.py).
MIN_TORCH = (2, 7)

# MegaBlocks' parts: (import name, its compiled CUDA extension or None, the pinned distribution).
# megablocks' own ops (histogram, sort, cumsum, ... in csrc/ops.cu) are the extension
# `megablocks_ops`, which megablocks' setup.py builds only when torch is a CUDA build and
# CUDA_HOME is found, else it installs without them after one warning; grouped_gemm's GEMMs are
# `grouped_gemm_backend`; stanford-stk (`stk`) is Python + Triton.
MEGABLOCKS_PARTS = (
    ("megablocks", "megablocks_ops", "megablocks==0.10.0"),
    ("grouped_gemm", "grouped_gemm_backend", "grouped_gemm==0.3.0"),
    ("stk", None, "stanford-stk==0.7.1"),
)
MEGABLOCKS_BUILD = (
    "CUDA_HOME=/usr/local/cuda-12.6 TORCH_CUDA_ARCH_LIST='8.0;9.0' pip install "
    "--no-build-isolation --no-deps --no-cache-dir --force-reinstall "
    + " ".join(pin for _, _, pin in MEGABLOCKS_PARTS))


class BackendUnavailableError(RuntimeError, ValueError):
    """A backend cannot run on this machine. A RuntimeError (`MoEBackend.check_available`'s
    contract) and a ValueError, so every command reports it as bad input (exit 2)."""


def torch_too_old(version: str | None = None) -> str | None:
    """Why the installed torch (or `version`) is older than the pinned sets allow, or None."""
    if version is None:
        import torch
        version = torch.__version__
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) >= MIN_TORCH:
        return None
    floor = ".".join(map(str, MIN_TORCH))
    return (f"torch {version} is older than this pipeline supports (torch >= {floor}, the lowest "
            f"of its pinned sets: requirements-gpu-megablocks.txt pins {floor}.0, "
            f"requirements-gpu-torch.txt and requirements-cpu.txt a current torch); install one "
            f"of them (README, Install)")


def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 (ImportError, OSError for a missing CUDA library, ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def megablocks_missing() -> str | None:
    """Why the MegaBlocks MoE backend cannot run here, or None when it can: a CUDA GPU, each
    package, and each package's compiled ops, imported (not only found); then how to build."""
    import torch
    missing, build = [], False
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    for package, compiled, pin in MEGABLOCKS_PARTS:
        if importlib.util.find_spec(package) is None:
            missing.append(f"the '{package}' package ({pin})")
            build = True
        elif compiled and (problem := _import_problem(compiled)):
            missing.append(
                f"{package}'s compiled ops '{compiled}' ({problem}): {package} was installed "
                f"without building them (CUDA_HOME unset or a CPU-only torch at install time), or "
                f"built against another torch than the installed {torch.__version__}")
            build = True
    if not build and (problem := _import_problem("megablocks.layers.dmoe")):
        missing.append(f"an importable megablocks.layers.dmoe ({problem})")
    if build:
        missing.append("(to build them: on a CUDA node, in the environment of "
                       "requirements-gpu-megablocks.txt (torch 2.7.0), CUDA_HOME = a CUDA 12.x "
                       "toolkit with nvcc, TORCH_CUDA_ARCH_LIST = the GPUs' compute capabilities: "
                       f"{MEGABLOCKS_BUILD}; README, Install)")
    return "; ".join(missing) or None


def require_megablocks() -> None:
    """Raise one BackendUnavailableError naming everything the megablocks backend lacks here."""
    reason = megablocks_missing()
    if reason:
        raise BackendUnavailableError(f"moe_backend='megablocks' needs {reason}; or use "
                                      f"moe_backend='torch' (same checkpoint layout)")


def require_moe_backend(name: str, key: str) -> None:
    """At a stage's start, before any weights load: raise BackendUnavailableError when the MoE
    backend `name` (config key `key`) cannot run on this machine."""
    from ..registry import MOE_BACKENDS
    try:
        MOE_BACKENDS.get(name, key).check_available()
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(f"{key}={name}: {exc}") from None

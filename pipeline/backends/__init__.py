"""Optional heavy backends (DeepSpeed, MegaBlocks). The only package allowed to import them;
every import happens lazily inside a function so `import pipeline.backends` stays cheap."""
from __future__ import annotations

import importlib.util


def megablocks_missing() -> str | None:
    """Why the MegaBlocks MoE backend cannot run here, or None when it can."""
    import torch
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    for module, pip_name in (("megablocks", "megablocks"), ("grouped_gemm", "grouped_gemm")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the '{module}' package (pip install {pip_name})")
    return "; ".join(missing) or None


def require_megablocks() -> None:
    """Raise one RuntimeError naming everything the megablocks backend lacks on this machine."""
    reason = megablocks_missing()
    if reason:
        raise RuntimeError(f"moe_backend='megablocks' needs {reason}; "
                           "use moe_backend='torch' (same checkpoint layout) instead")

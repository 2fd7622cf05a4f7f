"""Numeric precision of training and evaluation (`<stage>.train.precision`, `eval.precision`).

One name per setting, from `PRECISIONS`:

- `auto`: what the pipeline always did: bf16 on CUDA (DeepSpeed bf16 for training, bf16 weights
  for evaluation), fp32 on CPU.
- `fp32`: fp32 everywhere (what tests compare against).
- `bf16`: bf16 compute. On CUDA as `auto`. On CPU only where the CPU has bf16 instructions
  (avx512_bf16 or AMX, detected by torch, never assumed): training under `torch.autocast("cpu",
  bfloat16)` with fp32 parameters, gradients and optimizer states (master weights); evaluation in
  bf16 compute with log-probabilities taken in fp32. On a CPU without them it is one error
  (`check_precision`), raised before any work starts: never a silent slow path.

`resolve_precision(name, device)` turns a name into what a stage does on a device: "fp32" or
"bf16". Plain functions, no engine imports.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterable, Optional

import torch

from .registry import PRECISIONS


def cpu_bf16_support() -> Optional[str]:
    """The CPU feature that makes bf16 matmuls fast here ("amx" / "avx512_bf16"), else None."""
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, fn in probes:
        probe = getattr(torch.cpu, fn, None)
        if probe is not None and probe():
            return name
    return None


def check_precision(name: str, where: str, device_type: str,
                    cpu_feature: Optional[str] = "detect") -> str:
    """`name` if it can run on `device_type` ("cpu"/"cuda"), else one ValueError naming `where`.

    `cpu_feature` is for tests: "detect" asks the CPU, None means "no bf16 instructions"."""
    PRECISIONS.check(name, where)
    if name == "bf16" and device_type == "cpu":
        feature = cpu_bf16_support() if cpu_feature == "detect" else cpu_feature
        if feature is None:
            raise ValueError(f"{where}: bf16 was asked for, but this CPU has no bf16 instructions "
                             "(neither avx512_bf16 nor AMX); bf16 would run on a slow emulated "
                             "path. Use 'fp32' (or 'auto', which is fp32 on CPU)")
    return name


def resolve_precision(name: str, device_type: str, where: str = "precision") -> str:
    """"fp32" or "bf16": what `name` means on `device_type` (checked: see `check_precision`)."""
    check_precision(name, where, device_type)
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return name


def torch_dtype(resolved: str) -> torch.dtype:
    """torch dtype of a resolved precision ("fp32"/"bf16")."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[resolved]


# which precision setting each stage of `h3fusion run` uses (stage name prefix -> config key)
_STAGE_PRECISION = (("base", "base.train.precision"), ("expert_", "expert.train.precision"),
                    ("baseline_multitask_", "expert.train.precision"),
                    ("fuse", "fusion.train.precision"),
                    ("baseline_extra_steps_", "fusion.train.precision"),
                    ("evaluate", "eval.precision"))


def _setting(cfg: Any, key: str) -> str:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def stage_precisions(cfg: Any, stage_names: Iterable[str]) -> dict[str, str]:
    """config key -> precision name, for the settings the stages in `stage_names` read."""
    keys = {key for name in stage_names for prefix, key in _STAGE_PRECISION
            if name == prefix or (prefix.endswith("_") and name.startswith(prefix))}
    return {key: _setting(cfg, key) for key in sorted(keys)}


def require_precisions(cfg: Any, stage_names: Iterable[str], device_type: Optional[str] = None,
                       cpu_feature: Optional[str] = "detect") -> None:
    """One ValueError, before any stage runs, when a stage about to run asks for a precision this
    machine cannot run (bf16 on a CPU without bf16 instructions). `device_type` None: "cuda"
    where torch sees a GPU, else "cpu". The tiny base always pretrains on the CPU."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    for key, name in stage_precisions(cfg, stage_names).items():
        check_precision(name, key, "cpu" if key == "base.train.precision" else device_type,
                        cpu_feature)


def cpu_autocast_dtype(resolved: str, device_type: str) -> Optional[torch.dtype]:
    """The dtype a training stage's forward runs under `torch.autocast` in: bf16 for a resolved
    "bf16" on the CPU (fp32 parameters, gradients and optimizer states), else None (CUDA bf16 is
    DeepSpeed's bf16 mode, fp32 is plain fp32)."""
    return torch.bfloat16 if resolved == "bf16" and device_type == "cpu" else None


def autocast_forward(dtype: Optional[torch.dtype], device_type: str):
    """The context a training engine runs its forward in: `torch.autocast(device_type, dtype)`,
    or nothing when `dtype` is None. The backward runs outside it (autograd replays each op in
    its forward dtype); loss terms computed after the forward (the fusion losses) stay fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class PrecisionModes:
    """What a resolved precision does, shared by the evaluator's and the trainers' precision
    records (frozen dataclasses with `requested`, `resolved` and `device_type`): the autocast
    dtype (CPU bf16), the mode in words (AUTOCAST_MODE / BF16_MODE: each subclass's own) and the
    record written to reports and manifests."""
    AUTOCAST_MODE: ClassVar[str]   # the mode of CPU bf16 (autocast), in words
    BF16_MODE: ClassVar[str]       # the mode of CUDA bf16, in words

    @property
    def autocast(self) -> Optional[torch.dtype]:
        """The dtype forwards run under `torch.autocast` in (CPU bf16), else None."""
        return cpu_autocast_dtype(self.resolved, self.device_type)

    @property
    def mode(self) -> str:
        if self.resolved == "fp32":
            return "fp32"
        return self.AUTOCAST_MODE if self.autocast is not None else self.BF16_MODE

    def record(self) -> dict:
        return {"requested": self.requested, "resolved": self.resolved,
                "device": self.device_type, "mode": self.mode}

"""What `<stage>.train.precision` means for one training stage on one device (pipeline.precision).

    p = TrainPrecision.resolve("expert.train.precision", cfg.expert.train.precision, "cpu")
    DsTrainSettings(..., precision=p.resolved)      # DeepSpeed bf16 mode on CUDA only
    build_engine(..., autocast=p.autocast)          # CPU bf16: the forward under torch.autocast
    manifest["precision"] = p.record()

- CUDA, "bf16" (and "auto"): DeepSpeed's bf16 mode (bf16 weights, fp32 master copy).
- CPU, "bf16": the forward (and so the backward) computes in bf16 under `torch.autocast`, while
  the parameters, their gradients, the ZeRO partitions and the optimizer states stay fp32 and
  DeepSpeed runs in its fp32 mode. Our own autocast around the engine's forward, not DeepSpeed's
  `torch_autocast` section: that one all-gathers the Linear weights and reduces their gradients
  in bf16 and keeps a process-wide flag; this keeps gradients and collectives fp32, and the
  plain-torch engine of the tiny base gets the same switch.
- "fp32" (and CPU "auto"): fp32 everywhere.

`resolve` checks first (bf16 on a CPU without bf16 instructions: one ValueError naming the key),
so a stage calls it before it loads any model.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..precision import PrecisionModes, resolve_precision


@dataclass(frozen=True)
class TrainPrecision(PrecisionModes):
    key: str            # the config key, e.g. "expert.train.precision"
    name: str           # its value: auto | fp32 | bf16
    device_type: str    # "cpu" / "cuda": where the stage trains
    resolved: str       # "fp32" / "bf16"
    AUTOCAST_MODE = "torch.autocast bf16 forward; fp32 parameters, gradients, optimizer states"
    BF16_MODE = "DeepSpeed bf16 (bf16 weights, fp32 master weights and optimizer states)"

    @classmethod
    def resolve(cls, key: str, name: str, device_type: str) -> "TrainPrecision":
        return cls(key, name, device_type, resolve_precision(name, device_type, key))

    @property
    def requested(self) -> str:
        return self.name

    def record(self) -> dict:
        """What a manifest says about how the stage was trained."""
        return {"setting": self.key, **super().record()}

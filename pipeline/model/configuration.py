"""`H3FusionConfig`: a Llama config plus the MoE fields of the fused model."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..config import TASKS

MOE_BACKENDS = ("torch", "megablocks")


@strict
class H3FusionConfig(LlamaConfig):
    """Llama with every MLP replaced by a dropless top-k MoE of GLU experts.

    Only serialisable MoE settings live here; the expert-parallel process group is runtime state
    set by `pipeline.model.apply_expert_parallel`, never saved.
    """

    model_type = "h3fusion"

    num_experts: int = len(TASKS)
    top_k: int = 2
    expert_names: list[str] | None = None   # one name per expert; None = TASKS when E == 3
    moe_backend: str = "torch"              # torch | megablocks

    def __post_init__(self, **kwargs):
        if self.expert_names is None:
            self.expert_names = list(TASKS) if self.num_experts == len(TASKS) else \
                [f"expert{i}" for i in range(self.num_experts)]
        else:
            self.expert_names = list(self.expert_names)
        self.check_moe_fields()   # a plain ValueError, before hub's strict-dataclass wrapping
        super().__post_init__(**kwargs)

    def check_moe_fields(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"H3FusionConfig.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"H3FusionConfig.top_k must be in [1, num_experts={self.num_experts}], "
                             f"got {self.top_k}")
        if len(self.expert_names) != self.num_experts:
            raise ValueError(f"H3FusionConfig.expert_names has {len(self.expert_names)} names "
                             f"but num_experts={self.num_experts}: {self.expert_names}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"H3FusionConfig.moe_backend must be one of {MOE_BACKENDS}, "
                             f"got {self.moe_backend!r}")

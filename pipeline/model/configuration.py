"""`H3FusionConfig`: a Llama config plus the MoE fields of the fused model."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..config_ranges import top_k_problem
from ..dimensions import DEFAULT_DIMENSIONS
from ..dimensions import expert_names as checked_expert_names
from ..registry import MOE_BACKENDS

_DEFAULT_EXPERTS_PER_TOKEN = 2


@strict
class H3FusionConfig(LlamaConfig):
    """Llama with every MLP replaced by a dropless top-k MoE of GLU experts.

    Only serialisable MoE settings live here; the expert-parallel process group is runtime state
    set by `pipeline.model.apply_expert_parallel`, never saved.

    The routing top-k is `num_experts_per_tok` (Mixtral's name): transformers reads a config's
    `top_k` as the top-k *sampling* setting (GenerationConfig.from_model_config), so a routing
    value saved under that name made sampled generation keep only 2 tokens. config.json files
    written before the rename hold `top_k`; it is read as `num_experts_per_tok` on load.
    """

    model_type = "h3fusion"

    num_experts: int = len(DEFAULT_DIMENSIONS)
    num_experts_per_tok: int = _DEFAULT_EXPERTS_PER_TOKEN   # routing top-k
    expert_names: list[str] | None = None   # one name per expert; None = the default dimensions when E == 3
    moe_backend: str = "torch"              # a name in pipeline.registry.MOE_BACKENDS

    def __post_init__(self, **kwargs):
        self._read_legacy_top_k(kwargs)
        if self.expert_names is None:
            self.expert_names = list(DEFAULT_DIMENSIONS) if self.num_experts == len(DEFAULT_DIMENSIONS) else \
                [f"expert{i}" for i in range(self.num_experts)]
        else:
            self.expert_names = list(self.expert_names)
        self.check_moe_fields()   # a plain ValueError, before hub's strict-dataclass wrapping
        super().__post_init__(**kwargs)

    def _read_legacy_top_k(self, kwargs: dict) -> None:
        # popped before LlamaConfig sees it: transformers drops generation-parameter names from
        # config kwargs, which would silently reset an old checkpoint's top-k to the default
        legacy = kwargs.pop("top_k", None)
        if legacy is None:
            return
        if self.num_experts_per_tok not in (_DEFAULT_EXPERTS_PER_TOKEN, legacy):
            raise ValueError(f"H3FusionConfig: legacy top_k={legacy} contradicts "
                             f"num_experts_per_tok={self.num_experts_per_tok}; give only "
                             f"num_experts_per_tok")
        self.num_experts_per_tok = int(legacy)

    def check_moe_fields(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"H3FusionConfig.num_experts must be >= 1, got {self.num_experts}")
        problem = top_k_problem(self.num_experts_per_tok, self.num_experts)
        if problem:
            raise ValueError(f"H3FusionConfig.num_experts_per_tok {problem}")
        checked_expert_names({"expert_names": self.expert_names, "num_experts": self.num_experts},
                             "H3FusionConfig")
        MOE_BACKENDS.check(self.moe_backend, "H3FusionConfig.moe_backend")

"""Which parameters of a fused model train: the trainable sets (`fusion.trainable`).

Each set is one `TrainableSet` registered in `pipeline.registry.TRAINABLE_SETS`:
- `router`: only `mlp.router.weight` of every layer.
- `router+experts`: routers and the stacked experts `mlp.experts.w1/v1/w2` (the experts move:
  the drift penalty has a reference to keep, and the extra-steps baseline is its control).
- `router+lora`: routers plus PEFT LoRA adapters on the attention projections
  (`fusion.lora.target_modules`, a subset of q/k/v/o_proj; all four by default). Our experts are
  stacked `[E*F, H]` tensors, not `nn.Linear`s, so PEFT cannot wrap them; LoRA on attention is
  the cheap adapter that still adapts every layer. Returns the PEFT-wrapped model (use the
  returned object).
Everything else (embeddings, norms, attention base weights, lm_head) is frozen. Code that
depends on the set reads its properties (`trains_experts`, `lora`), never its name.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config_schema import FUSION_LORA_TARGETS as ATTENTION_LORA_TARGETS
from ..registry import TRAINABLE_SETS

TRAINABLE_MODES = TRAINABLE_SETS.names()   # the registered names, in registry order


def _is_router(name: str) -> bool:
    return ".mlp.router." in name


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


@dataclass(frozen=True)
class TrainableSet:
    """The routers always train; `trains_experts`: the stacked experts too (so they drift from
    fused_init: the drift penalty's snapshot, the extra-steps baseline); `lora`: PEFT LoRA
    adapters on the attention projections too."""
    name: str
    trains_experts: bool = False
    lora: bool = False

    def trains(self, param_name: str) -> bool:
        """Whether a parameter of the unwrapped model trains (LoRA adapters come with PEFT)."""
        return _is_router(param_name) or (self.trains_experts and _is_expert(param_name))

    def apply(self, model: nn.Module, lora_r: int = 8, lora_alpha: float = 16.0,
              lora_dropout: float = 0.0, lora_targets=ATTENTION_LORA_TARGETS) -> nn.Module:
        """Freeze all but this set's parameters; returns the model to train (PEFT-wrapped for
        LoRA on `lora_targets`, attention projections only)."""
        bad = [t for t in lora_targets if t not in ATTENTION_LORA_TARGETS]
        if self.lora and (bad or not lora_targets):
            raise ValueError(f"LoRA targets {list(lora_targets)}: fusion's LoRA wraps only "
                             f"{list(ATTENTION_LORA_TARGETS)}")
        for name, param in model.named_parameters():
            param.requires_grad_(self.trains(name))
        if not self.lora:
            return model
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(lora_targets), bias="none")
        peft_model = get_peft_model(model, lora)   # freezes everything except the adapters
        for name, param in peft_model.named_parameters():
            if _is_router(name):
                param.requires_grad_(True)
        return peft_model


ROUTER = TrainableSet("router")
ROUTER_EXPERTS = TrainableSet("router+experts", trains_experts=True)
ROUTER_LORA = TrainableSet("router+lora", lora=True)


def trainable_set(name: str, where: str = "fusion.trainable") -> TrainableSet:
    """The set registered as `name`; an unknown name is one error listing the registered ones."""
    return TRAINABLE_SETS.get(name, where)


def sets_training_experts() -> list[str]:
    """The registered sets whose experts train (for messages about what needs them)."""
    return [n for n in TRAINABLE_SETS.names() if trainable_set(n, "trainable set").trains_experts]


def set_trainable(model: nn.Module, mode: str, lora_r: int = 8, lora_alpha: float = 16.0,
                  lora_dropout: float = 0.0, lora_targets=ATTENTION_LORA_TARGETS) -> nn.Module:
    """Freeze all but the parameters of the trainable set `mode`; returns the model to train
    (PEFT-wrapped for LoRA on `lora_targets`, attention projections only)."""
    return trainable_set(mode, "trainable mode").apply(model, lora_r, lora_alpha, lora_dropout,
                                                       lora_targets)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_param_groups(model: nn.Module, router_lr: float | None = None) -> list[dict]:
    """Optimizer param groups of the trainable parameters: routers (with their own `lr` when
    `router_lr` is given: a zero-initialised linear router learns far slower than the experts
    should move) and everything else (the optimizer's default lr)."""
    routers, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (routers if _is_router(name) else others).append(param)
    groups = [{"params": routers, **({"lr": router_lr} if router_lr is not None else {})},
              {"params": others}]
    return [g for g in groups if g["params"]]

"""Which parameters of a fused model train: `set_trainable(model, mode)`.

Modes (FusionConfig.trainable):
- `router`: only `mlp.router.weight` of every layer.
- `router+experts`: routers and the stacked experts `mlp.experts.w1/v1/w2`.
- `router+lora`: routers plus PEFT LoRA adapters on the attention projections
  (`fusion.lora.target_modules`, a subset of q/k/v/o_proj; all four by default). Our experts are stacked `[E*F, H]` tensors, not `nn.Linear`s, so PEFT cannot
  wrap them; LoRA on attention is the cheap adapter that still adapts every layer. Returns the
  PEFT-wrapped model (use the returned object).
Everything else (embeddings, norms, attention base weights, lm_head) is frozen.
"""
from __future__ import annotations

from torch import nn

from ..config_schema import FUSION_LORA_TARGETS as ATTENTION_LORA_TARGETS

TRAINABLE_MODES = ("router", "router+experts", "router+lora")


def _is_router(name: str) -> bool:
    return ".mlp.router." in name


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def set_trainable(model: nn.Module, mode: str, lora_r: int = 8, lora_alpha: float = 16.0,
                  lora_dropout: float = 0.0, lora_targets=ATTENTION_LORA_TARGETS) -> nn.Module:
    """Freeze all but `mode`'s parameters; returns the model to train (PEFT-wrapped for LoRA on
    `lora_targets`, attention projections only)."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable mode must be one of {TRAINABLE_MODES}, got {mode!r}")
    bad = [t for t in lora_targets if t not in ATTENTION_LORA_TARGETS]
    if mode == "router+lora" and (bad or not lora_targets):
        raise ValueError(f"LoRA targets {list(lora_targets)}: fusion's LoRA wraps only "
                         f"{list(ATTENTION_LORA_TARGETS)}")
    for name, param in model.named_parameters():
        param.requires_grad_(_is_router(name) or (mode == "router+experts" and _is_expert(name)))
    if mode != "router+lora":
        return model
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=list(lora_targets), bias="none")
    peft_model = get_peft_model(model, lora)   # freezes everything except the adapters
    for name, param in peft_model.named_parameters():
        if _is_router(name):
            param.requires_grad_(True)
    return peft_model


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

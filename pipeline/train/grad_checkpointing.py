"""The `train.gradient_checkpointing` switch of every training stage: the tiny base
(`base.train`), stage 1 and the multi-task baseline (`expert.train`), stage 2 and the extra-steps
baseline (`fusion.train`).

On, each decoder layer keeps only its input during the forward pass and runs its forward again
in the backward pass (non-reentrant `torch.utils.checkpoint` through transformers'
`GradientCheckpointingLayer`, which both the Llama and the H3Fusion decoder layers are; the
H3Fusion layer returns its routing tensors in a flat tuple, so the gating loss still reads them).
Activation memory drops from every layer's intermediates to one layer's plus each layer's input;
the price is one extra forward pass per layer in every step. Losses and gradients are unchanged
(tests/unit/test_gradient_checkpointing.py).
"""
from __future__ import annotations

from torch import nn

CHECKPOINT_KWARGS = {"use_reentrant": False}


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """Train mode (transformers' `from_pretrained` returns eval mode, where LoRA dropout and the
    layers' checkpointing are off) and, when asked, gradient checkpointing of every decoder
    layer. Call it before wrapping the model with PEFT; returns `model`."""
    model.train()
    if not gradient_checkpointing:
        return model
    if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
    if not checkpointed_layers(model):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} has no decoder "
                         "layer that transformers can checkpoint")
    return model


def checkpointed_layers(model: nn.Module) -> int:
    """How many modules recompute their forward in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules()
               if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)

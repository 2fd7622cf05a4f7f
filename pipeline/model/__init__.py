"""The fused H3Fusion MoE model: config, modules, expert parallelism, trainable-parameter modes.

Importing this package registers `H3FusionConfig` / `H3FusionForCausalLM` with transformers'
`AutoConfig` / `AutoModelForCausalLM` (model_type "h3fusion").
"""
from transformers import AutoConfig, AutoModelForCausalLM

from ..registry import MOE_BACKENDS
from .configuration import H3FusionConfig
from .expert_parallel import ExpertParallel, apply_expert_parallel, expert_ranges
from .modeling import (H3FusionCausalLMOutput, H3FusionDecoderLayer, H3FusionForCausalLM,
                       H3FusionModel, H3FusionModelOutput)
from .moe import GLUExperts, H3FusionMoE, moe_layers, set_moe_backend
from .moe_backend import MoEBackend, TorchBackend
from .routing import RouterOutput
from .trainable import TRAINABLE_MODES, set_trainable

AutoConfig.register(H3FusionConfig.model_type, H3FusionConfig, exist_ok=True)
AutoModelForCausalLM.register(H3FusionConfig, H3FusionForCausalLM, exist_ok=True)

__all__ = [
    "MOE_BACKENDS", "TRAINABLE_MODES", "ExpertParallel", "GLUExperts", "H3FusionCausalLMOutput",
    "H3FusionConfig", "H3FusionDecoderLayer", "H3FusionForCausalLM", "H3FusionMoE", "H3FusionModel",
    "H3FusionModelOutput", "MoEBackend", "RouterOutput", "TorchBackend", "apply_expert_parallel",
    "expert_ranges", "moe_layers", "set_moe_backend", "set_trainable",
]

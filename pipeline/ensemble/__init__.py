"""LLM-ensemble baselines (probability averaging, per-prompt expert routing, the oracle router)
as HF causal LMs. The methods are pipeline.registry.ENSEMBLES: each entry is an EnsembleMethod
(pipeline.ensemble.method) in its own module, with its build / mix or choose / load hooks.

Importing this package registers `EnsembleConfig` / `EnsembleForCausalLM` with transformers'
`AutoConfig` / `AutoModelForCausalLM` (model_type "h3fusion_ensemble"), so an ensemble dir loads
like any model dir (pipeline.eval.models.load_causal_lm).
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .method import EnsembleBuild, EnsembleMethod, MixingMethod, RoutingMethod
from .modeling import EnsembleConfig, EnsembleForCausalLM

AutoConfig.register(EnsembleConfig.model_type, EnsembleConfig, exist_ok=True)
AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM, exist_ok=True)

__all__ = ["EnsembleBuild", "EnsembleConfig", "EnsembleForCausalLM", "EnsembleMethod", "MixingMethod",
           "RoutingMethod"]

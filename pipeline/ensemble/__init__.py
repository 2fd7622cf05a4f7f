"""LLM-ensemble baselines (probability averaging, per-prompt expert routing, the oracle router)
as HF causal LMs (methods: pipeline.registry.ENSEMBLES).

Importing this package registers `EnsembleConfig` / `EnsembleForCausalLM` with transformers'
`AutoConfig` / `AutoModelForCausalLM` (model_type "h3fusion_ensemble"), so an ensemble dir loads
like any model dir (pipeline.eval.models.load_causal_lm).
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .modeling import CLASSIFIER_FILE, ENSEMBLE_METHODS, EnsembleConfig, EnsembleForCausalLM

AutoConfig.register(EnsembleConfig.model_type, EnsembleConfig, exist_ok=True)
AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM, exist_ok=True)

__all__ = ["CLASSIFIER_FILE", "ENSEMBLE_METHODS", "EnsembleConfig", "EnsembleForCausalLM"]

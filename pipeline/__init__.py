"""H3Fusion: fuse helpful / harmless / honest aligned LLMs into one sparse MoE.

Importing the package registers the fused model with transformers (`AutoConfig`,
`AutoModelForCausalLM`, model_type "h3fusion"), so `AutoModelForCausalLM.from_pretrained(<fused
dir>)` works after a plain `import pipeline`. The price is importing torch and transformers'
Llama modules with the package (~3 s once per process); every stage needs them anyway. A lazier
scheme (registering when transformers' auto classes are first imported) would have to run our
model code in the middle of transformers' own import chain, where its modules are half-built.
"""
__version__ = "0.1.0"

from . import model as _model  # noqa: E402,F401  (import side effect: the Auto registration)
from . import ensemble as _ensemble  # noqa: E402,F401  (registers model_type "h3fusion_ensemble")

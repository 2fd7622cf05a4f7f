"""export_mixtral: an H3Fusion MoE as a Hugging Face Mixtral checkpoint.

Written in the canonical Mixtral hub layout (`block_sparse_moe.gate.weight`,
`block_sparse_moe.experts.N.w1/w2/w3.weight`), which transformers 5 converts on load into its
fused `mlp.experts.gate_up_proj`/`down_proj` and which older loaders read as is.

Router math is identical: transformers' MixtralTopKRouter and ours (pipeline.model.routing.route)
both take a bias-free linear router, softmax over all E in fp32, top-k, then renormalise the k
weights. Anything Mixtral cannot express is refused instead of exported approximately.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.safetensors_io import DEFAULT_SHARD_BYTES
from ..config_ranges import top_k_problem
from . import plan
from .extract_expert import expert_rows, open_moe, write_from_moe

MANIFEST = "export_manifest.json"
# Llama config fields with the same meaning in MixtralConfig.
SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                 "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                 "attention_dropout", "rope_parameters", "dtype")


def check_expressible(cfg: dict, source: str) -> None:
    """Mixtral has no attention/MLP biases and routes with k <= E; refuse anything else."""
    experts, top_k = int(cfg["num_experts"]), plan.experts_per_token(cfg, source)
    problem = top_k_problem(top_k, experts, " (Mixtral: num_experts_per_tok <= num_local_experts)")
    if problem:
        raise ValueError(f"{source}: num_experts_per_tok {problem}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{source}: {flag}=true cannot be expressed in Mixtral (no biases)")
    if int(cfg.get("pretraining_tp", 1) or 1) != 1:
        raise ValueError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")


def mixtral_config(cfg: dict):
    from transformers import MixtralConfig
    fields = {k: cfg[k] for k in SHARED_FIELDS if k in cfg}
    out = MixtralConfig(**fields, num_local_experts=int(cfg["num_experts"]),
                        num_experts_per_tok=plan.experts_per_token(cfg, "config.json"),
                        sliding_window=None,
                        router_jitter_noise=0.0, output_router_logits=False)
    out.architectures = ["MixtralForCausalLM"]
    return out


def mixtral_key(layer: int, rest: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.{rest}"


def export_mixtral(moe: str | Path, out: str | Path, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    moe, out = Path(moe), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    cfg, spec, reader = open_moe(moe)
    check_expressible(cfg, str(moe / "config.json"))
    mix_cfg = mixtral_config(cfg)
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

    def layer_tensors(layer: int):
        yield mixtral_key(layer, "gate.weight"), reader.get(plan.router_key(layer))
        for e in range(len(cfg["expert_names"])):
            for proj, t in expert_rows(reader, layer, e, spec.intermediate_size).items():
                yield mixtral_key(layer, f"experts.{e}.{names[proj]}.weight"), t

    return write_from_moe(moe, out, reader, spec, layer_tensors, mix_cfg,
                          MANIFEST, {"tool": "export_mixtral", "expert_names": cfg["expert_names"]},
                          overwrite, max_shard_bytes)

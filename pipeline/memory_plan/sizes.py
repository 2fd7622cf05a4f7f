"""Model sizes for the memory planner (`pipeline.memory_plan`, `h3fusion plan`): the base model's
real config (no weights) and, per training stage, its model built on the meta device with the
stage's trainable set, counted by role.

Where the base config comes from (`base_spec`, the first that applies):
- `base.path` a local dir: its `config.json`;
- `base.path` a hub id (`hf:org/name[@revision]`, pipeline.checkpoint.hub; or a bare `org/name`): its
  `config.json` in the local Hugging Face cache (nothing is downloaded), else the published
  config shipped in
  `pipeline/presets/model_configs/<org>__<name>.json` (said so in the plan's output);
- `base.gguf`: the GGUF file's header (`pipeline.checkpoint.gguf_header`, no tensor data read);
- otherwise the tiny base the pipeline builds: `base.tiny` sizes, vocab `tokenizer.vocab_size`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..config import PRESET_DIR, PipelineConfig

FALLBACK_CONFIG_DIR = PRESET_DIR / "model_configs"
HF_PREFIX = "hf:"
STAGES = ("expert", "fusion", "baseline multitask", "baseline extra_steps")


@dataclass(frozen=True)
class BaseSpec:
    fields: dict      # Llama config.json fields
    origin: str       # where they came from, in words


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    largest_unit: int             # parameters ZeRO-3 gathers at once (a leaf module with all its children)
    largest_unit_trainable: int
    largest_unit_name: str
    largest_module_own: int       # DeepSpeed's estimator definition: own parameters of one module
    largest_tensor: int = 0       # the largest single parameter tensor


@dataclass(frozen=True)
class StageModel:
    """What the memory formulas need of one stage's model."""
    stage: str                    # one of STAGES
    kind: str                     # "dense" (LlamaForCausalLM) | "moe" (H3FusionForCausalLM)
    counts: ParamCounts
    trainable: str                # in words
    lora_sites: tuple             # per decoder layer: (linear name, in_features, r, dropout > 0) per LoRA-wrapped linear
    ffn_trainable: bool           # the dense FFN's own weights train (stage 1 method ffn)
    first_attention_grad: bool    # layer 0's attention is on the backward path
    first_mlp_grad: bool          # layer 0's FFN / experts keep their activations
    snapshot_params: int = 0      # experts copied at fusion start (drift reference, router+experts)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: top level must be a JSON object")
    return data


def _llama_fields(fields: dict, origin: str) -> BaseSpec:
    archs = fields.get("architectures") or []
    if fields.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(f"{origin}: model_type {fields.get('model_type')!r} is not Llama-style "
                         f"(the planner builds LlamaForCausalLM / H3FusionForCausalLM)")
    return BaseSpec({k: v for k, v in fields.items() if not k.startswith("_")}, origin)


def hub_config_spec(hub_id: str, cache_dir: Optional[str | Path] = None,
                    revision: Optional[str] = None) -> BaseSpec:
    """A hub id's config: the local HF cache (never the network), else the copy shipped in the
    repo (`FALLBACK_CONFIG_DIR/<org>__<name>.json`)."""
    from huggingface_hub import try_to_load_from_cache
    parts = hub_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise FileNotFoundError(f"base.path {hub_id!r}: not a local model dir and not a hub id "
                                f"of the form org/name")
    cached = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return _llama_fields(_read_json(Path(cached), "config"), f"{hub_id} config.json from the "
                                                                  f"local Hugging Face cache")
    shipped = FALLBACK_CONFIG_DIR / f"{hub_id.replace('/', '__')}.json"
    if shipped.is_file():
        return _llama_fields(_read_json(shipped, "shipped config"),
                             f"{hub_id}: published config.json values shipped in the repo "
                             f"({shipped.relative_to(PRESET_DIR.parent.parent)}); its config is not "
                             f"in the local Hugging Face cache and the hub is not contacted")
    raise FileNotFoundError(
        f"base.path {hub_id!r}: no local dir of that name, no config.json for that hub id in the "
        f"local Hugging Face cache, and no shipped copy in {FALLBACK_CONFIG_DIR}; pass a local "
        f"model dir (--set base.path=DIR) or fetch the config first "
        f"(`hf download {hub_id} config.json`)")


def base_spec(cfg: PipelineConfig, cache_dir: Optional[str | Path] = None) -> BaseSpec:
    """The base model's config fields and where they came from (see the module docstring)."""
    base = cfg.base
    if base.path:
        spec = base.path
        if not spec.startswith(HF_PREFIX) and Path(spec).is_dir():
            cfg_file = Path(spec) / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(f"base.path {spec} is not a Hugging Face model dir (no config.json)")
            return _llama_fields(_read_json(cfg_file, "base config"), str(cfg_file))
        if spec.startswith(HF_PREFIX):
            from ..checkpoint.hub import parse_model_spec
            ref = parse_model_spec(spec, "base.path")
            return hub_config_spec(ref.repo_id, cache_dir, ref.revision)
        return hub_config_spec(spec, cache_dir)
    if base.gguf:
        from ..checkpoint.gguf import resolve_gguf
        from ..checkpoint.gguf_header import gguf_llama_config
        path = resolve_gguf(base.gguf)
        return _llama_fields(gguf_llama_config(path), f"GGUF header of {path}")
    t = base.tiny
    fields = {"model_type": "llama", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
              "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
              "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
              "vocab_size": cfg.tokenizer.vocab_size, "tie_word_embeddings": False}
    return BaseSpec(fields, "the tiny base the pipeline builds (base.tiny sizes, vocab "
                            "tokenizer.vocab_size)")


# ----------------------------------------------------------------------------- meta models

def dense_model(fields: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig.from_dict(dict(fields, model_type="llama")))


def moe_model(fields: dict, num_experts: int, top_k: int, expert_names: list[str]):
    """The fused MoE; the torch backend (parameter layout is the same on every backend)."""
    from ..model import H3FusionConfig, H3FusionForCausalLM
    config = H3FusionConfig.from_dict(dict(fields, model_type="h3fusion", num_experts=num_experts,
                                           num_experts_per_tok=top_k, moe_backend="torch",
                                           expert_names=list(expert_names)))
    with torch.device("meta"):
        return H3FusionForCausalLM(config)


def count_params(model: torch.nn.Module, leaf_types: tuple = ()) -> ParamCounts:
    """Parameters (shared ones once) and the largest unit ZeRO-3 gathers: a module's own
    parameters, or all parameters of a `leaf_types` module (a ZeRO-3 leaf) at once."""
    params = {id(p): p for p in model.parameters()}
    best, best_train, best_name, own_max = 0, 0, "", 0
    inside: tuple = ()   # name prefixes of the leaf modules seen (their children are in them)
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        own_max = max(own_max, sum(p.numel() for p in own))
        if name.startswith(inside):
            continue
        unit = own
        if isinstance(module, leaf_types):
            unit, inside = list(module.parameters()), (*inside, name + ".")
        n = sum(p.numel() for p in unit)
        if n > best:
            best, best_train, best_name = n, sum(p.numel() for p in unit if p.requires_grad), name
    return ParamCounts(sum(p.numel() for p in params.values()),
                       sum(p.numel() for p in params.values() if p.requires_grad),
                       best, best_train, best_name, own_max,
                       max((p.numel() for p in params.values()), default=0))


def _lora_sites(model: torch.nn.Module) -> tuple:
    """(name, in_features, r, dropout > 0) of each LoRA-wrapped linear in one decoder layer."""
    sites, layer = [], ".layers.1." if _layers(model) > 1 else ".layers.0."
    for name, module in model.named_modules():
        if layer in name + "." and hasattr(module, "lora_A") and "default" in module.lora_A:
            drop = module.lora_dropout["default"]
            sites.append((name.rsplit(".", 1)[-1], module.in_features, module.r["default"],
                          not isinstance(drop, torch.nn.Identity)))
    return tuple(sites)


def _layers(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "num_hidden_layers", 1))


def _stage_model(stage: str, kind: str, model, trainable: str, leaf_types: tuple = (),
                 input_grads: bool = False) -> StageModel:
    first = input_grads or any(p.requires_grad for n, p in model.named_parameters()
                               if "embed_tokens" in n or ".layers.0.self_attn." in n)
    first_mlp = first or any(p.requires_grad for n, p in model.named_parameters()
                             if ".layers.0.mlp." in n and ".router." not in n)
    ffn = any(p.requires_grad for n, p in model.named_parameters()
              if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")))
    return StageModel(stage, kind, count_params(model, leaf_types), trainable, _lora_sites(model),
                      ffn, first, first_mlp)


def dense_stage(stage: str, fields: dict, method: str, lora=None) -> StageModel:
    """Stage 1 (and the training baselines, method "ffn"): the dense base, FFN or LoRA."""
    from ..train.expert.stage import mark_ffn_trainable
    model = dense_model(fields)
    if method == "ffn":
        mark_ffn_trainable(model)
        return _stage_model(stage, "dense", model, "FFN (gate/up/down)")
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules),
                                             task_type="CAUSAL_LM"))
    targets = "/".join(t.replace("_proj", "") for t in lora.target_modules)
    return _stage_model(stage, "dense", model, f"LoRA r={lora.r} ({targets})")


def fusion_stage(cfg: PipelineConfig, fields: dict, zero_stage: int) -> StageModel:
    """Stage 2: the fused MoE with `fusion.trainable`; under ZeRO-3 every MoE block is a leaf
    module and the inputs require grad (pipeline.train.fusion.loop)."""
    from ..model import H3FusionMoE
    from ..model.trainable import trainable_set
    f = cfg.fusion
    trained = trainable_set(f.trainable)
    model = moe_model(fields, len(cfg.dimensions), f.top_k, list(cfg.dimensions))
    model = trained.apply(model, f.lora.r, f.lora.alpha, f.lora.dropout, f.lora.target_modules)
    what = f.trainable + (f" (r={f.lora.r} q/k/v/o)" if trained.lora else "")
    stage = _stage_model("fusion", "moe", model, what, (H3FusionMoE,) if zero_stage == 3 else (),
                         input_grads=zero_stage == 3)
    # FusionLoop._snapshot_experts: a copy of every expert when they train (ZeRO-3: of the
    # empty partitioned placeholders, so nothing)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return replace(stage, snapshot_params=experts if trained.trains_experts and zero_stage < 3 else 0)

"""Pure planning for checkpoint surgery: parameter names, shapes and compatibility checks.

Nothing here touches weights; it reads `config.json` dicts and the key/shape listings of
checkpoints, so every mismatch is found before a single output byte is written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..dimensions import expert_names  # noqa: F401  (plan.expert_names: the checked names of a fused config)

MOE_PARAMS = ("w1", "v1", "w2")          # MegaBlocks GLU layout, each [E*F, H]
# Llama config fields that must agree across the base and every expert.
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "hidden_act",
               "tie_word_embeddings", "head_dim", "attention_bias", "mlp_bias")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts surgery needs, read from one model's config.json."""
    source: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: Mapping, source: str | Path) -> "ModelSpec":
        missing = [k for k in ("model_type", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "vocab_size") if k not in cfg]
        if missing:
            raise ValueError(f"{source}: config.json lacks {missing}")
        return cls(str(source), cfg["model_type"], int(cfg["hidden_size"]),
                   int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]),
                   int(cfg["vocab_size"]))


def parse_named_dirs(items: list[str], flag: str = "--experts") -> dict[str, Path]:
    """['helpful=DIR', ...] -> {'helpful': Path(DIR)} in the given order; duplicates are errors."""
    named: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag}: expected NAME=DIR, got {item!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{flag}: name {name!r} must be letters, digits, '_', '-' or '.'")
        if name in named:
            raise ValueError(f"{flag}: duplicate expert name {name!r} ({named[name]} and {path})")
        named[name] = Path(path)
    if not named:
        raise ValueError(f"{flag}: at least one NAME=DIR is required")
    return named


def check_llama(cfg: Mapping, source: str | Path) -> None:
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type must be 'llama' (a LlamaForCausalLM dir), "
                         f"got {cfg.get('model_type')!r}")


def check_same_architecture(base_cfg: Mapping, others: Mapping[str, Mapping],
                            base_source: str | Path) -> None:
    """Every model in `others` (name -> config dict) must match the base on ARCH_FIELDS."""
    check_llama(base_cfg, base_source)
    for name, cfg in others.items():
        check_llama(cfg, name)
        for key in ARCH_FIELDS:
            if cfg.get(key) != base_cfg.get(key):
                raise ValueError(f"{name}: config.json {key}={cfg.get(key)!r} differs from the "
                                 f"base ({base_source}) {key}={base_cfg.get(key)!r}")


def layer_of(key: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); None outside layers."""
    m = _LAYER_RE.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def is_dense_mlp_key(key: str) -> bool:
    parsed = layer_of(key)
    return parsed is not None and parsed[1].startswith("mlp.")


def is_moe_key(key: str) -> bool:
    parsed = layer_of(key)
    return parsed is not None and parsed[1].startswith(("mlp.router.", "mlp.experts."))


def dense_mlp_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def router_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.router.weight"


def moe_expert_key(layer: int, param: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{param}"


def dense_mlp_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    h, f = spec.hidden_size, spec.intermediate_size
    return {"gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def moe_shapes(spec: ModelSpec, num_experts: int) -> dict[str, tuple[int, int]]:
    """Shapes of one MoE layer's tensors (docs/contracts.md)."""
    h, ef = spec.hidden_size, num_experts * spec.intermediate_size
    return {"router": (num_experts, h), "w1": (ef, h), "v1": (ef, h), "w2": (ef, h)}


def check_dense_mlp_keys(shapes: Mapping[str, tuple], spec: ModelSpec, source: str) -> None:
    """A dense checkpoint must hold every layer's gate/up/down with the right shapes."""
    expected = dense_mlp_shapes(spec)
    for layer in range(spec.num_hidden_layers):
        for proj, shape in expected.items():
            key = dense_mlp_key(layer, proj)
            if key not in shapes:
                raise ValueError(f"{source}: missing tensor {key}")
            if tuple(shapes[key]) != shape:
                raise ValueError(f"{source}: tensor {key} has shape {list(shapes[key])}, "
                                 f"expected {list(shape)}")
    extra = [k for k in shapes if is_dense_mlp_key(k) and
             (layer_of(k)[0] >= spec.num_hidden_layers)]
    if extra:
        raise ValueError(f"{source}: tensors beyond num_hidden_layers={spec.num_hidden_layers}: "
                         f"{extra[:3]}")


def check_moe_keys(shapes: Mapping[str, tuple], spec: ModelSpec, num_experts: int,
                   source: str) -> None:
    """A fused checkpoint must hold every layer's router/w1/v1/w2 with the contract shapes."""
    expected = moe_shapes(spec, num_experts)
    for layer in range(spec.num_hidden_layers):
        wanted = {router_key(layer): expected["router"]}
        wanted.update({moe_expert_key(layer, p): expected[p] for p in MOE_PARAMS})
        for key, shape in wanted.items():
            if key not in shapes:
                raise ValueError(f"{source}: missing tensor {key}")
            if tuple(shapes[key]) != shape:
                raise ValueError(f"{source}: tensor {key} has shape {list(shapes[key])}, "
                                 f"expected {list(shape)}")
    known = {router_key(l) for l in range(spec.num_hidden_layers)}
    known |= {moe_expert_key(l, p) for l in range(spec.num_hidden_layers) for p in MOE_PARAMS}
    unexpected = sorted(k for k in shapes if layer_of(k) and layer_of(k)[1].startswith("mlp.")
                        and k not in known)
    if unexpected:
        # e.g. LoRA adapters on the experts: dropping them silently would change the model
        raise ValueError(f"{source}: unexpected MoE tensors {unexpected[:3]} (only router.weight "
                         f"and experts.w1/v1/w2 are understood; fold adapters in first)")


_SHARED_KEY_RE = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(weight|bias))$")


def check_shared_keys(keys: list[str], source: str) -> None:
    """Outside the MoE, a fused model holds only Llama's tensors (no adapters, no prefixes)."""
    unknown = sorted(k for k in keys if not is_moe_key(k) and not _SHARED_KEY_RE.match(k))
    if unknown:
        raise ValueError(f"{source}: tensors that are not part of a Llama/H3Fusion model: "
                         f"{unknown[:3]} (PEFT adapters? fold them in first)")


def check_same_keys(reference: Mapping[str, tuple], other: Mapping[str, tuple],
                    ref_source: str, other_source: str) -> None:
    """Two dense checkpoints hold the same tensor names with the same shapes."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(f"{other_source}: tensor names differ from {ref_source}: "
                         f"missing {missing[:3]}, extra {extra[:3]}")
    for key, shape in reference.items():
        if tuple(other[key]) != tuple(shape):
            raise ValueError(f"{other_source}: tensor {key} has shape {list(other[key])}, "
                             f"{ref_source} has {list(shape)}")


def expert_index(expert_names: list[str], name: str, source: str) -> int:
    if name not in expert_names:
        raise ValueError(f"{source}: no expert named {name!r} (experts: {expert_names})")
    return expert_names.index(name)


# `top_k`: the routing top-k's name in config.json files written before it became
# `num_experts_per_tok` (pipeline.model.configuration)
MOE_CONFIG_FIELDS = ("num_experts", "num_experts_per_tok", "top_k", "expert_names", "moe_backend")


def experts_per_token(model_cfg: Mapping, source: str) -> int:
    """A fused model config's routing top-k (`num_experts_per_tok`, or the legacy `top_k`)."""
    for key in ("num_experts_per_tok", "top_k"):
        if model_cfg.get(key) is not None:
            return int(model_cfg[key])
    raise ValueError(f"{source}: config.json has no num_experts_per_tok (routing top-k)")


def dense_config_from_moe(moe_cfg: Mapping) -> dict:
    """The LlamaConfig dict of one expert pulled out of a fused model's config dict."""
    dense = {k: v for k, v in moe_cfg.items() if k not in MOE_CONFIG_FIELDS}
    dense["model_type"] = "llama"
    dense["architectures"] = ["LlamaForCausalLM"]
    return dense

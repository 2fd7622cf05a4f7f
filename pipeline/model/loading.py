"""Build an H3Fusion model in its training dtype and place without a full intermediate copy.

`load_streamed(model_dir, dtype, device)` builds the model on the meta device (no memory, no
random init), then reads the safetensors shards one at a time and assigns each tensor, already
converted to `dtype` and moved to `device`, as the module's parameter (`load_state_dict(...,
assign=True)`). On a CUDA device the host holds at most one tensor of one memory-mapped shard at
a time; on the CPU in the checkpoint's own dtype the parameters stay views of the memory-mapped
shards (as transformers' `from_pretrained` does), so nothing is copied either. Non-persistent
buffers (the rotary `inv_freq`) are not in the checkpoint: they are recomputed on the target
device from the config, as `from_pretrained` computes them. Tied weights (`lm_head` =
`embed_tokens` when `tie_word_embeddings`) are tied after loading.

`model_from_state_dict(state, model_dir)` is the same without the files: a model holding exactly
the tensors of `state` (consolidated weights on rank 0), built on meta, nothing copied.

ZeRO-3 does not come here: there, transformers' `from_pretrained` runs under DeepSpeed's
`zero.Init` (`pipeline.backends.deepspeed_engine.zero3_init_context`) so that no rank ever holds
the whole model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..checkpoint.safetensors_io import CheckpointReader

__all__ = ["load_streamed", "model_from_state_dict", "meta_model"]


def meta_model(model_dir: str | Path, dtype: torch.dtype, **config_overrides) -> nn.Module:
    """The model class of `model_dir/config.json` on the meta device, parameters in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM   # h3fusion: registered by .__init__

    config = AutoConfig.from_pretrained(str(model_dir), **config_overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _attach_generation_config(model, Path(model_dir))
    return model


def _attach_generation_config(model: nn.Module, model_dir: Path) -> None:
    """generation_config.json of the dir, as `from_pretrained` reads it (saved models keep it),
    without a legacy routing top-k taken for top-k sampling (`H3FusionForCausalLM`)."""
    if (model_dir / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    drop = getattr(model, "_drop_legacy_routing_top_k", None)
    if drop is not None:
        drop()


def _shard_tensors(reader: CheckpointReader, shard: str, convert: Callable) -> dict:
    from safetensors import safe_open

    keys = [k for k, s in reader.weight_map.items() if s == shard]
    with safe_open(str(reader.dir / shard), framework="pt") as f:
        return {k: convert(f.get_tensor(k)) for k in keys}


def load_streamed(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
                  **config_overrides) -> nn.Module:
    """The model of `model_dir` in `dtype` on `device`, read shard by shard (see module doc);
    `config_overrides` update its config (e.g. num_experts_per_tok). Returns it in eval mode,
    like `from_pretrained`."""
    device = torch.device(device)
    model = meta_model(model_dir, dtype, **config_overrides)

    def convert(t: torch.Tensor) -> torch.Tensor:   # integer tensors (none in ours) keep dtype
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    with CheckpointReader(model_dir) as reader:   # every shard's header checked before loading
        for shard in sorted(set(reader.weight_map.values())):
            tensors = _shard_tensors(reader, shard, convert)
            _assign(model, tensors, reader.dir / shard)
            del tensors
    finish_meta_model(model, device, str(model_dir))
    return model.eval()


def _assign(model: nn.Module, tensors: dict, source) -> None:
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{source}: tensors {sorted(result.unexpected_keys)[:5]} are not in the "
                         f"{type(model).__name__} of its config.json")


def model_from_state_dict(state: dict[str, torch.Tensor], model_dir: str | Path,
                          wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
                          **config_overrides) -> nn.Module:
    """A model of `model_dir`'s config holding exactly `state` (its tensors, not copies).
    `wrap(model)` runs on the meta model first (e.g. PEFT wrapping, so `state`'s LoRA keys fit);
    returns the wrapped model."""
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    device = next(iter(state.values())).device
    base = meta_model(model_dir, dtype, **config_overrides)
    model = wrap(base) if wrap is not None else base
    _assign(model, state, "consolidated state dict")
    finish_meta_model(base, device, "consolidated state dict")
    return model


def finish_meta_model(model: nn.Module, device: torch.device, source: str) -> None:
    """Tie weights, recompute non-persistent buffers on `device`; raise if anything is still on
    meta (a tensor missing from the checkpoint)."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and module.inv_freq.is_meta:
            _rebuild_rotary(module, device)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"{source}: no weights for {len(missing)} tensors of the "
                         f"{type(model).__name__}, e.g. {missing[:5]}")


def _rebuild_rotary(module: nn.Module, device: torch.device) -> None:
    """The rotary embedding's inverse frequencies, computed from its config exactly as its
    constructor does (on the CPU, in float32), placed on `device`."""
    fresh = type(module)(config=module.config)
    for name in ("inv_freq", "original_inv_freq"):
        setattr(module, name, getattr(fresh, name).to(device))
    module.attention_scaling = fresh.attention_scaling

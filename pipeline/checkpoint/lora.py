"""LoRA adapters: split a trained PEFT state dict, save it as a PEFT adapter, merge it into W.

PEFT's LoRA linear computes `y = x W^T + scale * (x A^T) B^T` with `scale = alpha / r` (or
`alpha / sqrt(r)` with rsLoRA), so merging is `W' = W + scale * B @ A` (A: [r, in], B: [out, r]).
The merge here works on plain state dicts (no PEFT model needed) and is checked against PEFT's
`merge_and_unload` in tests/unit/test_lora_merge.py. Folding an adapter dir into a model dir is
pipeline.checkpoint.merge_lora (this module has no model-dir I/O, so zero_to_hf can import it).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    if r <= 0:
        raise ValueError(f"LoRA rank r must be > 0, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def split_peft_state_dict(peft_state: dict[str, torch.Tensor], adapter_name: str = "default"
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A PEFT model's in-memory state dict -> (base weights with plain HF names,
    adapter weights with PEFT's on-disk names `base_model.model.<module>.lora_{A,B}.weight`)."""
    base, adapter = {}, {}
    for key, tensor in peft_state.items():
        m = _LORA_KEY.match(key)
        if m:
            if m.group("name") not in (None, adapter_name):
                continue
            module = m.group("module")
            module = module if module.startswith(PEFT_PREFIX) else PEFT_PREFIX + module
            adapter[f"{module}.lora_{m.group('ab')}.weight"] = tensor
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        base[name.replace(".base_layer.", ".")] = tensor
    return base, adapter


def merge_lora_state_dict(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                          scale: float) -> dict[str, torch.Tensor]:
    """`W + scale * B @ A` for every adapted module; other tensors are returned unchanged."""
    merged = dict(base)
    modules = sorted({k[:-len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")})
    if not modules:
        raise ValueError("adapter state dict has no '*.lora_A.weight' tensors")
    for module in modules:
        a, b = adapter[f"{module}.lora_A.weight"], adapter.get(f"{module}.lora_B.weight")
        if b is None:
            raise ValueError(f"adapter: {module}.lora_A.weight has no matching lora_B.weight")
        target = (module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module) + ".weight"
        if target not in base:
            raise ValueError(f"adapter targets {target}, which the base state dict does not have")
        w = base[target]
        if tuple(w.shape) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            raise ValueError(f"{target}: base {tuple(w.shape)} vs lora_B {tuple(b.shape)} @ "
                             f"lora_A {tuple(a.shape)} do not fit")
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
        merged[target] = (w.to(torch.float32) + delta).to(w.dtype)
    return merged


def save_adapter(adapter: dict[str, torch.Tensor], out_dir: str | Path, base_dir: str | Path,
                 r: int, alpha: float, dropout: float, target_modules: list[str]) -> None:
    """Write a PEFT-loadable adapter dir (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base_dir))
    config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter tensors) of a PEFT LoRA adapter dir."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"LoRA adapter file missing: {path}")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    return config, load_file(str(weights))

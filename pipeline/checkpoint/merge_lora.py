"""`merge_lora` tool: a base HF model dir + a PEFT LoRA adapter dir -> merged HF model dir.

Kept apart from `lora` (the pure state-dict merge) because it writes model dirs through
`zero_to_hf`, which itself imports `lora`: the dependency runs one way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .lora import lora_scale, merge_lora_state_dict, read_adapter
from .hf_model import load_hf_state_dict, save_hf_model


def merge_lora_dir(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                   max_shard_size: str = "2GB", overwrite: bool = False,
                   extra_manifest: Optional[dict] = None) -> dict:
    """Base HF model dir + PEFT adapter dir -> merged HF model dir (atomic, with manifest)."""
    config, adapter = read_adapter(adapter_dir)
    scale = lora_scale(int(config["r"]), float(config["lora_alpha"]),
                       bool(config.get("use_rslora", False)))
    merged = merge_lora_state_dict(load_hf_state_dict(base_dir), adapter, scale)
    info = {"kind": "lora-merged", "base": str(base_dir), "adapter": str(adapter_dir),
            "r": config["r"], "lora_alpha": config["lora_alpha"], "scale": scale,
            **(extra_manifest or {})}
    return save_hf_model(merged, base_dir, out_dir, max_shard_size=max_shard_size,
                         overwrite=overwrite, manifest=info)

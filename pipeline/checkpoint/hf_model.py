"""Hugging Face model dirs as state dicts: read one (`load_hf_state_dict`) and write one
(`save_hf_model`: safetensors, sharded when large, beside the config and tokenizer of a reference
model dir), optionally with a LoRA adapter saved under `adapter/`. The DeepSpeed ZeRO -> HF
conversion that writes through here is pipeline.backends.zero_to_hf.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..io_utils import MANIFEST, atomic_dir, sha256_dir, write_json
from .lora import save_adapter
from .safetensors_io import CheckpointReader, copy_tokenizer_files

ADAPTER_SUBDIR = "adapter"


def load_hf_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All weights of an HF safetensors model dir (single file or sharded)."""
    with CheckpointReader(model_dir) as reader:
        return {k: reader.get(k).clone() for k in reader.keys()}


def _model_from_state_dict(state: dict[str, torch.Tensor], config_dir: Path):
    """An HF model (class from config.json) holding exactly `state`; built on the meta device so
    a 7B model is never randomly initialised or held twice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict does not fit the model of {config_dir}/config.json: "
                         f"missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    return model


def save_hf_model(state: dict[str, torch.Tensor], config_dir: str | Path, out_dir: str | Path,
                  max_shard_size: str = "2GB", overwrite: bool = False,
                  manifest: Optional[dict] = None, adapter: Optional[dict] = None) -> dict:
    """Write `state` as an HF model dir with `config_dir`'s config + tokenizer, atomically.
    `adapter`: {"tensors", "r", "alpha", "dropout", "target_modules"} to save under adapter/."""
    config_dir = Path(config_dir)
    t0 = time.time()
    model = _model_from_state_dict(state, config_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        copy_tokenizer_files(config_dir, tmp)
        if adapter is not None:
            save_adapter(adapter["tensors"], tmp / ADAPTER_SUBDIR, config_dir, adapter["r"],
                         adapter["alpha"], adapter["dropout"], adapter["target_modules"])
        info = {**(manifest or {}), "config_from": str(config_dir),
                "num_params": sum(t.numel() for t in state.values()),
                "dtype": str(next(iter(state.values())).dtype), "save_s": round(time.time() - t0, 3)}
        info["files"] = sha256_dir(tmp)
        write_json(tmp / MANIFEST, info)
    return info

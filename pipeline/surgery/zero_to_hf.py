"""DeepSpeed ZeRO checkpoint -> Hugging Face model dir (safetensors, sharded when large).

DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`, via
`pipeline.backends.deepspeed_engine`) gathers the fp32 master weights of every rank's partition
and the frozen parameters; this module writes them in HF layout next to the config and tokenizer
of a reference model dir (the base the run started from). A checkpoint of a PEFT LoRA model is
written merged (W + alpha/r * B A), with its adapter saved under `adapter/`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..io_utils import MANIFEST, atomic_dir, sha256_dir, write_json
from .lora import PEFT_PREFIX, lora_scale, merge_lora_state_dict, save_adapter, split_peft_state_dict
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


def _lora_settings(ds_dir: Path) -> dict:
    """The LoRA r/alpha a trainer stored in its run's client state (see pipeline.train.expert)."""
    import json

    meta = ds_dir / "lora.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{ds_dir} holds a PEFT LoRA checkpoint but no lora.json with r/alpha")
    return json.loads(meta.read_text())


def zero_to_hf(ds_dir: str | Path, config_dir: str | Path, out_dir: str | Path,
               tag: Optional[str] = None, max_shard_size: str = "2GB",
               overwrite: bool = False) -> dict:
    """Consolidate the ZeRO checkpoint `ds_dir[/tag]` and write it as an HF model dir."""
    from ..backends.deepspeed_engine import latest_tag, zero_checkpoint_fp32_state_dict

    ds_dir = Path(ds_dir)
    state = zero_checkpoint_fp32_state_dict(ds_dir, tag)
    tag = tag or latest_tag(ds_dir)
    info = {"kind": "zero_to_hf", "ds_dir": str(ds_dir), "tag": tag}
    if not any(k.startswith(PEFT_PREFIX) for k in state):
        return save_hf_model(state, config_dir, out_dir, max_shard_size, overwrite, info)
    lora = _lora_settings(ds_dir)
    base, adapter = split_peft_state_dict(state)
    merged = merge_lora_state_dict(base, adapter, lora_scale(lora["r"], lora["alpha"]))
    return save_hf_model(merged, config_dir, out_dir, max_shard_size, overwrite,
                         {**info, "lora": lora}, adapter={"tensors": adapter, **lora})

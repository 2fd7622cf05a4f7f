"""DeepSpeed ZeRO checkpoint -> Hugging Face model dir.

DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`, via
`deepspeed_engine`) gathers the fp32 master weights of every rank's partition and the frozen
parameters; `pipeline.checkpoint.hf_model.save_hf_model` writes them in HF layout next to the
config and tokenizer of a reference model dir (the base the run started from). A checkpoint of a
PEFT LoRA model is written merged (W + alpha/r * B A), with its adapter saved under `adapter/`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..checkpoint.hf_model import save_hf_model
from ..checkpoint.lora import PEFT_PREFIX, lora_scale, merge_lora_state_dict, split_peft_state_dict
from .deepspeed_engine import latest_tag, zero_checkpoint_fp32_state_dict


def _lora_settings(ds_dir: Path) -> dict:
    """The LoRA r/alpha a trainer stored in its run's client state (see pipeline.train.expert.stage)."""
    meta = ds_dir / "lora.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{ds_dir} holds a PEFT LoRA checkpoint but no lora.json with r/alpha")
    return json.loads(meta.read_text())


def zero_to_hf(ds_dir: str | Path, config_dir: str | Path, out_dir: str | Path,
               tag: Optional[str] = None, max_shard_size: str = "2GB",
               overwrite: bool = False) -> dict:
    """Consolidate the ZeRO checkpoint `ds_dir[/tag]` and write it as an HF model dir."""
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

"""extract_expert: one expert of an H3Fusion MoE back out as a dense LlamaForCausalLM dir.

Shared tensors (embeddings, attention, norms, LM head) are copied; the expert's rows of
w1/v1/w2 become gate_proj/up_proj/down_proj (down_proj = w2 rows transposed back). Without
fusion training in between, build_moe -> extract_expert reproduces the expert bit for bit.
"""
from __future__ import annotations

from pathlib import Path

from ..io_utils import atomic_dir, sha256_dir, write_json
from . import plan
from ..checkpoint.safetensors_io import (DEFAULT_SHARD_BYTES, CheckpointReader, ShardedWriter,
                             copy_optional_files, copy_tokenizer_files, read_config_json)

MANIFEST = "extract_manifest.json"


def open_moe(moe_dir: str | Path) -> tuple[dict, plan.ModelSpec, CheckpointReader]:
    """Read and validate a fused model dir: its config, spec and a reader of its weights."""
    cfg = read_config_json(moe_dir)
    if cfg.get("model_type") != "h3fusion":
        raise ValueError(f"{moe_dir}: model_type must be 'h3fusion' (a build_moe output), "
                         f"got {cfg.get('model_type')!r}")
    names = plan.expert_names(cfg, f"{moe_dir}/config.json")
    spec = plan.ModelSpec.from_config(cfg, moe_dir)
    reader = CheckpointReader(moe_dir)
    plan.check_moe_keys(reader.shapes(), spec, len(names), str(moe_dir))
    plan.check_shared_keys(reader.keys(), str(moe_dir))
    return cfg, spec, reader


def expert_rows(reader: CheckpointReader, layer: int, expert: int, ffn: int) -> dict:
    """Expert `expert`'s dense gate/up/down weights of one layer."""
    rows = slice(expert * ffn, (expert + 1) * ffn)
    return {
        "gate_proj": reader.get(plan.moe_expert_key(layer, "w1"))[rows],
        "up_proj": reader.get(plan.moe_expert_key(layer, "v1"))[rows],
        "down_proj": reader.get(plan.moe_expert_key(layer, "w2"))[rows].t(),
    }


def write_from_moe(moe: Path, out: Path, reader: CheckpointReader, spec: plan.ModelSpec,
                   layer_tensors, hf_config, manifest_file: str, manifest: dict,
                   overwrite: bool, max_shard_bytes: int) -> Path:
    """Write `out` (atomically) from the MoE dir `moe`: its non-MoE tensors as they are, then for
    each layer the (key, tensor) pairs of `layer_tensors(layer)`, `hf_config`, the tokenizer and
    generation config, and `manifest` (plus the source dir and its hash) as `manifest_file`."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for key in reader.keys():
            if not plan.is_moe_key(key):
                writer.add(key, reader.get(key))
        for layer in range(spec.num_hidden_layers):
            for key, tensor in layer_tensors(layer):
                writer.add(key, tensor)
        writer.close()
        hf_config.save_pretrained(tmp)
        copy_tokenizer_files(moe, tmp)
        copy_optional_files(moe, tmp, ["generation_config.json"])
        write_json(tmp / manifest_file, {**manifest, "source": str(moe.resolve()),
                                         "source_sha256": sha256_dir(moe)})
    return out


def extract_expert(moe: str | Path, name: str, out: str | Path, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    from transformers import LlamaConfig
    moe, out = Path(moe), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    cfg, spec, reader = open_moe(moe)
    index = plan.expert_index(cfg["expert_names"], name, str(moe))
    dense_cfg = LlamaConfig.from_dict(plan.dense_config_from_moe(cfg))

    def layer_tensors(layer: int):
        for proj, tensor in expert_rows(reader, layer, index, spec.intermediate_size).items():
            yield plan.dense_mlp_key(layer, proj), tensor

    return write_from_moe(moe, out, reader, spec, layer_tensors, dense_cfg,
                          MANIFEST, {"tool": "extract_expert", "expert": name, "expert_index": index},
                          overwrite, max_shard_bytes)

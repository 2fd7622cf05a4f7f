"""The base stage (`h3fusion base`): the dense base model every expert starts from.

Default: build a tiny `LlamaForCausalLM` (`base.tiny`, vocab from `<run>/tokenizer`) and pre-train
it briefly on `<run>/data/pretrain/train` (single process, AdamW, warmup + cosine). With
`base.path` the user's model (a local dir, or `hf:ORG/NAME[@REVISION]`: the snapshot in the
Hugging Face cache, fetched once; pipeline.checkpoint.hub, docs/hub.md) is validated (Llama-style) and
linked into `<run>/base`, before anything is written; with
`base.gguf` (or `--from-gguf`: a file, or `pkg:MODULE` for the .gguf inside an installed package)
the GGUF file is dequantized and converted once into a plain `LlamaForCausalLM` dir (safetensors +
the GGUF's tokenizer) there (pipeline.checkpoint.gguf; docs/smollm2.md). The pre-training loop is
pipeline.train.base.pretrain. Output written atomically with `manifest.json` last.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ...config import BaseConfig, ConfigError, TinyModelConfig
from ...checkpoint.hub import local_model_dir
from ...io_utils import MANIFEST, atomic_dir, check_output_dir, write_json
from ...layout import RunLayout
from ...checkpoint.gguf import check_llama_dir, convert_gguf, package_version, resolve_gguf
from .pretrain import pack_blocks, pretrain


def build_tiny_llama(tiny: TinyModelConfig, tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    if tiny.hidden_size % tiny.num_attention_heads:
        raise ConfigError(f"base.tiny.hidden_size {tiny.hidden_size} not divisible by "
                          f"num_attention_heads {tiny.num_attention_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads, max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _link_user_model(src: Path, tmp: Path) -> None:
    """Symlink the user's files so `<run>/base` is a loadable HF dir without copying weights."""
    for f in src.iterdir():
        if f.name != MANIFEST:
            os.symlink(f.resolve(), tmp / f.name)


def _tiny_base(cfg: BaseConfig, layout: RunLayout, tmp: Path, log) -> dict:
    from transformers import AutoTokenizer
    from ...data.loading import load_pretrain
    if not (layout.tokenizer / MANIFEST).is_file():
        raise FileNotFoundError(f"no finished tokenizer at {layout.tokenizer} (run `h3fusion tokenizer` first)")
    tokenizer = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    texts = load_pretrain(layout.data)["text"]
    block_len = min(cfg.train.max_seq_len, cfg.tiny.max_position_embeddings)
    blocks = pack_blocks(texts, tokenizer, block_len)
    model = build_tiny_llama(cfg.tiny, tokenizer, seed=cfg.train.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny Llama: {n_params / 1e6:.2f}M params, {len(blocks)} blocks of {block_len} tokens")
    stats = pretrain(model, blocks, cfg.train, log)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    return {"kind": "tiny-pretrained", "num_params": n_params, "tokenizer": str(layout.tokenizer),
            "seed": cfg.train.seed, **stats}


def _gguf_base(spec: str, tmp: Path, log) -> dict:
    path = resolve_gguf(spec)
    info = convert_gguf(path, tmp, log)
    return {**info, "gguf_spec": spec, "gguf_package": package_version(spec)}


def _user_model(value: str) -> tuple[Path, dict]:
    """`base.path` -> (its local dir, manifest info); a hub id resolves to its cached snapshot.
    Runs before the output dir is created: a bad path or an unavailable id writes nothing."""
    src, snapshot = local_model_dir(value, "base.path")
    config = check_llama_dir(src)
    info = {"kind": "user", "path": str(src.resolve()), "model_type": config["model_type"],
            "vocab_size": config.get("vocab_size")}
    if snapshot is not None:
        info["hub"] = snapshot.provenance()
    return src, info


def run_base_stage(cfg: BaseConfig, run_dir: str | Path, overwrite: bool = False, log=print) -> dict:
    layout = RunLayout.at(run_dir)
    t0 = time.time()
    check_output_dir(layout.base, overwrite)     # an existing base: refused before any download
    user = _user_model(cfg.path) if cfg.path else None
    if user is None and not cfg.gguf:   # pre-training: bf16 on a CPU without it is an error now
        from .pretrain import base_precision
        base_precision(cfg.train)
    with atomic_dir(layout.base, overwrite=overwrite) as tmp:
        if user is not None:
            src, info = user
            _link_user_model(src, tmp)
        elif cfg.gguf:
            info = _gguf_base(cfg.gguf, tmp, log)
        else:
            info = _tiny_base(cfg, layout, tmp, log)
        manifest = {"stage": "base", **info, "wall_s": round(time.time() - t0, 3)}
        write_json(tmp / MANIFEST, manifest)
    return manifest

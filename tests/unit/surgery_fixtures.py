"""Tiny random Llama dirs for the surgery and merging tests (hidden 32, 2 layers, vocab 128)."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
TASK_NAMES = ("helpful", "harmless", "honest")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def save_tiny_tokenizer(out: Path, extra_word: str | None = None) -> None:
    """A word-level tokenizer with VOCAB ids (specials 0-3), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    if extra_word:
        words[-1] = extra_word
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(out)


def save_tiny_llama(out: Path, seed: int, config=None, tokenizer: bool = True,
                    dtype=torch.float32):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config or tiny_llama_config()).to(dtype)
    model.save_pretrained(out)
    if tokenizer:
        save_tiny_tokenizer(out)
    return model


def make_expert(base_dir: Path, out: Path, seed: int, mlp_noise: float = 0.05,
                attn_noise: float = 0.0):
    """A copy of the base whose MLPs (and optionally attention) moved, like an aligned expert."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = mlp_noise if ".mlp." in name else attn_noise if ".self_attn." in name else 0
            if noise:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * noise)
    model.save_pretrained(out)
    save_tiny_tokenizer(out)
    return model


def make_family(root: Path, names=TASK_NAMES) -> tuple[Path, dict[str, Path]]:
    """A base and one expert per name under `root`."""
    base = root / "base"
    save_tiny_llama(base, seed=0)
    experts = {}
    for i, name in enumerate(names):
        experts[name] = root / "experts" / name
        make_expert(base, experts[name], seed=100 + i)
    return base, experts


def dense_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint.safetensors_io import CheckpointReader
    reader = CheckpointReader(model_dir)
    return {k: reader.get(k) for k in reader.keys()}

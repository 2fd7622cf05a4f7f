"""Builders for the evaluation and profiling tests (tiny char-level tokenizer, tiny dense and
fused models, a built-in data dir), plus checks of the builders themselves.

Char-level tokenizer: every printable character is a token, so arbitrary English prompts and
answers get distinct ids (a word-level toy vocabulary would map them all to <unk>).
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIALS + list(dict.fromkeys(string.printable))


def char_tokenizer(**options):
    """`options` go to the tokenizer (e.g. add_bos_token=True: a Llama-2-like tokenizer)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    model = models.BPE(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[], unk_token="<unk>")
    tok = Tokenizer(model)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", **options)


def _model_fields(**overrides) -> dict:
    fields = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    fields.update(overrides)
    return fields


def save_tiny_llama(out: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**_model_fields())).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def tiny_fused_model(seed: int = 0, router_std: float = 1.0):
    """A random H3FusionForCausalLM (3 experts, top-2) with a non-trivial router."""
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM

    torch.manual_seed(seed)
    model = H3FusionForCausalLM(H3FusionConfig(**_model_fields(), num_experts=3, top_k=2))
    with torch.no_grad():  # a zero router would tie every token; spread the choices instead
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0.0, router_std)
    return model.eval()


def save_tiny_fused(out: Path, seed: int = 0) -> Path:
    tiny_fused_model(seed).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def build_data_dir(run_dir: Path, per_split: int = 6) -> Path:
    """`<run>/data` from the built-in generator with a few rows per split."""
    from pipeline.config import BuiltinDataConfig, DataConfig, PipelineConfig
    from pipeline.data.stage import run_data_stage

    cfg = DataConfig(builtin=BuiltinDataConfig(train_per_task=per_split, dev_per_task=per_split,
                                               test_per_task=per_split, pretrain_per_task=4))
    run_data_stage(PipelineConfig(data=cfg), run_dir)
    return run_dir / "data"


def test_char_tokenizer_round_trips_text():
    tok = char_tokenizer()
    text = "How do I steal a car?\n### Response:\nI can't help."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text

"""Batched generation with any Hugging Face causal LM (`model.generate`), prompts in the Alpaca
template the models were trained with (or a model's chat template: pipeline.eval.prompts): left padding, rows sorted by length, results in input
order, each cut before its first eos (the end-of-response marker)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .scoring import model_device, pad_token_id


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[str], gen: GenerationConfig, max_len: int,
                    add_bos: bool = True) -> list[list[int]]:
    """New token ids of each prompt, cut before the first eos (the end-of-response marker)."""
    device = model_device(model)
    from pipeline.data.template import encode_prompt_response

    room = max(max_len - gen.max_new_tokens, 2)
    rows = [encode_prompt_response(tokenizer, p, None, room, add_bos)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad_id = pad_token_id(tokenizer)
    # generation pads on the left so every row's next token follows its own last prompt token;
    # the mask hides the pads and generate() derives position ids from it, so a row's greedy
    # tokens are those of its unpadded run up to float rounding of the padded matmuls
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new_tokens = out[:, width:].tolist()
    eos = tokenizer.eos_token_id
    return [toks[: toks.index(eos)] if eos in toks else toks for toks in new_tokens]


def generate_token_ids(model, tokenizer, prompts: Sequence[str], batch_size: int, max_len: int,
                       gen: GenerationConfig, desc: str = "generating",
                       add_bos: bool = True) -> list[list[int]]:
    """Generated token ids per formatted prompt (eos excluded), batched across prompts of similar
    length (left padding); results in input order. `add_bos=False` for prompts that carry their
    own special tokens (a chat template's rendering: pipeline.eval.prompts)."""
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[lo: lo + batch_size]
        for i, toks in zip(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx], gen,
                                                max_len, add_bos)):
            outputs[i] = toks
    return outputs


def generate_responses(model, tokenizer, prompts: Sequence[str], batch_size: int, max_len: int,
                       gen: GenerationConfig, desc: str = "generating") -> list[str]:
    """Batched generation from formatted prompts; returns the response text of each prompt."""
    return decode_responses(tokenizer, generate_token_ids(model, tokenizer, prompts, batch_size,
                                                          max_len, gen, desc))


def decode_responses(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """The response text of each generated token-id list (`generate_token_ids`)."""
    return [tokenizer.decode(toks, skip_special_tokens=True).strip() for toks in ids]

"""Batched log-likelihood scoring and generation with any Hugging Face causal LM.

Only the generic causal-LM interface is used: `model(input_ids=, attention_mask=).logits` and
`model.generate(...)`, so dense Llama models, merges and the fused H3Fusion MoE are scored by
the same code. Prompts use the Alpaca template the models were trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of a continuation given its prompt (prompt tokens masked out)."""
    total_ll: float
    num_tokens: int

    @property
    def mean_ll(self) -> float:
        return self.total_ll / max(self.num_tokens, 1)


def _encode_pair(tokenizer, prompt: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of bos+prompt+continuation+eos and the number of continuation tokens.

    Uses the data stage's `encode_prompt_response`, so the scored tokens are exactly the ones
    the models were trained on (the response ends with eos, the end-of-response marker; when
    too long the prompt loses tokens from its left, the continuation from its end).
    """
    from pipeline.data.template import encode_prompt_response

    prompt_ids, cont_ids = encode_prompt_response(tokenizer, prompt, continuation, max_len)
    if not cont_ids or not prompt_ids:
        raise ValueError(f"nothing left to score for continuation {continuation[:60]!r} "
                         f"(prompt {len(prompt_ids)}, continuation {len(cont_ids)} tokens, max_len {max_len})")
    return prompt_ids + cont_ids, len(cont_ids)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def _score_batch(model, seqs: list[list[int]], cont_lens: list[int], pad_id: int) -> list[float]:
    device = model_device(model)
    ids, mask = pad_right(seqs, pad_id)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    totals = []
    for row, (seq, n_cont) in enumerate(zip(seqs, cont_lens)):
        # logits at position t predict token t+1: the continuation's tokens sit at
        # positions len-n_cont .. len-1 and are predicted from positions one earlier.
        start = len(seq) - n_cont
        step_logits = logits[row, start - 1: len(seq) - 1].float()
        targets = ids[row, start: len(seq)].to(step_logits.device)
        logprobs = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None])
        totals.append(float(logprobs.sum()))
    return totals


def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int,
                        max_len: int, desc: str = "scoring") -> list[ContinuationScore]:
    """Score each (prompt, continuation): sum and count of continuation-token log-probs.

    Requests are sorted by length so each batch pads little; results come back in input order.
    """
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    encoded = [_encode_pair(tokenizer, p, c, max_len) for p, c in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad_id = pad_token_id(tokenizer)
    results: list[ContinuationScore | None] = [None] * len(encoded)
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[lo: lo + batch_size]
        totals = _score_batch(model, [encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad_id)
        for i, total in zip(idx, totals):
            results[i] = ContinuationScore(total, encoded[i][1])
    return results  # type: ignore[return-value]


def pad_token_id(tokenizer) -> int:
    """The pad id, falling back to EOS then UNK (padding is masked, so any id is safe)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has no pad, eos or unk token: cannot pad batches")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[str], gen: GenerationConfig, max_len: int) -> list[str]:
    device = model_device(model)
    from pipeline.data.template import encode_prompt_response

    room = max(max_len - gen.max_new_tokens, 2)
    rows = [encode_prompt_response(tokenizer, p, None, room)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad_id = pad_token_id(tokenizer)
    # generation pads on the left so every row's next token follows its own last prompt token
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new_tokens = out[:, width:].tolist()
    texts = []
    for toks in new_tokens:
        if tokenizer.eos_token_id in toks:  # stop at the end-of-response marker
            toks = toks[: toks.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return texts


def generate_responses(model, tokenizer, prompts: Sequence[str], batch_size: int, max_len: int,
                       gen: GenerationConfig, desc: str = "generating") -> list[str]:
    """Batched generation from formatted prompts; returns the response text of each prompt."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[lo: lo + batch_size]
        for i, text in zip(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx], gen, max_len)):
            outputs[i] = text
    return outputs

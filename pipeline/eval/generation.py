"""Batched generation with any Hugging Face causal LM, prompts in the Alpaca template the models
were trained with (or a model's chat template: pipeline.eval.prompts): left padding, rows sorted
by length, results in input order, each cut before its first eos (the end-of-response marker).

Greedy generation (eval.do_sample false, what the evaluation uses) runs its own decode loop with
the model's KV cache (`_greedy_batch`): a row that emitted eos leaves the batch
(`DynamicCache.batch_select_indices`), so finished rows stop costing compute, where HF
`generate()` keeps every row until the last one ends. Same tokens as `generate()` greedy
(tests/unit/test_generation_rows.py); ensembles decode member by member (a mixing method such
as "avg": every member's cache in lockstep, the argmax of the mixed distribution, the method's
`mix`; a per-prompt one such as "router"/"oracle": each row on the member its prompt chooses).
Sampled generation, and models whose generation_config asks for logits processing the loop does
not do, use `generate()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .models import compute_context
from .scoring import model_device, pad_token_id


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


# generation_config fields that make HF greedy decoding differ from a plain argmax
_PROCESSING_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
                      "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                      "forced_bos_token_id", "forced_eos_token_id", "num_beams",
                      "encoder_repetition_penalty", "exponential_decay_length_penalty",
                      "renormalize_logits", "epsilon_cutoff", "eta_cutoff", "guidance_scale")


def greedy_unsupported_reason(model) -> Optional[str]:
    """Why the per-row greedy loop cannot stand in for `generate()` on `model`, or None."""
    from transformers import GenerationConfig as HFGenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    if config.use_cache is False:
        return "its generation_config has use_cache=False (recompute every step)"
    default = HFGenerationConfig()
    changed = [f for f in _PROCESSING_FIELDS if getattr(config, f, None) != getattr(default, f, None)]
    return f"its generation_config sets {changed}" if changed else None


class _CachedModel:
    """One model decoding with its own KV cache; `scores` = float32 next-token logits."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


class _MixedMembers:
    """A mixing ensemble: its method's `mix` of the members' next-token logits, as its forward."""

    def __init__(self, ensemble):
        self.mix = ensemble.mix
        self.members = [_CachedModel(m) for m in ensemble.members]

    def step(self, ids, mask, pos) -> torch.Tensor:
        return self.mix(member.step(ids, mask, pos) for member in self.members)

    def keep(self, rows: torch.Tensor) -> None:
        for member in self.members:
            member.keep(rows)


@torch.no_grad()
def _greedy_rows(decoder, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                 eos: Optional[int]) -> list[list[int]]:
    """Greedy tokens of each left-padded row (eos included where reached); a row leaves the
    batch, and its KV cache rows are dropped, once it emitted eos."""
    live = torch.arange(ids.shape[0], device=ids.device)    # input row of each batch row
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    scores, last = decoder.step(ids, mask, pos), pos[:, -1:]
    for step in range(max_new):
        tokens = scores.argmax(dim=-1)
        for row, tok in zip(live.tolist(), tokens.tolist()):
            out[row].append(tok)
        going = tokens != eos if eos is not None else torch.ones_like(tokens, dtype=torch.bool)
        if step == max_new - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero(as_tuple=True)[0]
            decoder.keep(keep)
            live, tokens, mask, last = live[keep], tokens[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        scores = decoder.step(tokens[:, None], mask, last)
    return out


def _greedy_batch(model, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                  eos: Optional[int]) -> list[list[int]]:
    from .scoring import _is_ensemble

    if not _is_ensemble(model):
        return _greedy_rows(_CachedModel(model), ids, mask, max_new, eos)
    if not model.routes_per_prompt:
        return _greedy_rows(_MixedMembers(model), ids, mask, max_new, eos)
    choice = model.choose_members(ids, mask)    # per-prompt methods: from each row's prompt
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for m in choice.unique().tolist():
        rows = (choice == m).nonzero(as_tuple=True)[0]
        sub = _greedy_batch(model.members[m], ids[rows], mask[rows], max_new, eos)
        for row, toks in zip(rows.tolist(), sub):
            out[row] = toks
    return out


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[str], gen: GenerationConfig, max_len: int,
                    add_bos: bool = True, per_row: bool = True) -> list[list[int]]:
    """New token ids of each prompt, cut before the first eos (the end-of-response marker)."""
    device = model_device(model)
    from pipeline.data.template import encode_prompt_response

    room = max(max_len - gen.max_new_tokens, 2)
    rows = [encode_prompt_response(tokenizer, p, None, room, add_bos)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad_id = pad_token_id(tokenizer)
    # generation pads on the left so every row's next token follows its own last prompt token;
    # the mask hides the pads and position ids count each row's real tokens, so a row's greedy
    # tokens are those of its unpadded run up to float rounding of the padded matmuls
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long).to(device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long).to(device)
    eos = tokenizer.eos_token_id
    if per_row and not gen.do_sample and greedy_unsupported_reason(model) is None:
        new_tokens = _greedy_batch(model, ids, mask, gen.max_new_tokens, eos)
    else:
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                      eos_token_id=eos, pad_token_id=pad_id)
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new_tokens = out[:, width:].tolist()
    return [toks[: toks.index(eos)] if eos in toks else toks for toks in new_tokens]


def generate_token_ids(model, tokenizer, prompts: Sequence[str], batch_size: int, max_len: int,
                       gen: GenerationConfig, desc: str = "generating",
                       add_bos: bool = True, per_row: bool = True) -> list[list[int]]:
    """Generated token ids per formatted prompt (eos excluded), batched across prompts of similar
    length (left padding); results in input order. `add_bos=False` for prompts that carry their
    own special tokens (a chat template's rendering: pipeline.eval.prompts). `per_row=False`
    makes greedy generation use HF `generate()` (the former path: profiling and tests)."""
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    if per_row and not gen.do_sample and (reason := greedy_unsupported_reason(model)) is not None:
        print(f"note: {desc}: greedy generation through generate() (every row runs until the "
              f"batch's last one ends): {reason}", flush=True)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with compute_context(model):
        for lo in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[lo: lo + batch_size]
            for i, toks in zip(idx, _generate_batch(model, tokenizer, [prompts[i] for i in idx],
                                                    gen, max_len, add_bos, per_row)):
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

"""Batched log-likelihood scoring with any Hugging Face causal LM (generation: generation.py).

`score_continuations` (one prompt+answer sequence per answer) uses only the generic causal-LM
interface, `model(input_ids=, attention_mask=).logits`, so dense Llama models, merges, the fused
H3Fusion MoE and the ensembles are scored by the same code. `score_continuations_packed` gives
the same scores several times faster (each prompt once, its answers packed after it) for the
Llama-layout models (dense and H3Fusion) and for ensembles of them (member by member, combined
per token by a mixing method such as "avg", per request by a per-prompt one such as "router"
/ "oracle": pipeline.ensemble.method); `score_pairs` / `score_encoded`, what the
evaluation calls, pack when the model allows and fall back to one sequence per answer otherwise.
Prompts use the Alpaca template the models were trained with, or a model's own chat template
(pipeline.eval.prompts: `add_bos=False`, the rendered template carries its special tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .models import compute_context


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of a continuation given its prompt (prompt tokens masked out)."""
    total_ll: float
    num_tokens: int

    @property
    def mean_ll(self) -> float:
        return self.total_ll / max(self.num_tokens, 1)


def _encode_pair(tokenizer, prompt: str, continuation: str, max_len: int,
                 add_bos: bool = True) -> tuple[list[int], int]:
    """Token ids of bos+prompt+continuation+eos and the number of continuation tokens.

    Uses the data stage's `encode_prompt_response`, so the scored tokens are exactly the ones
    the models were trained on (the response ends with eos, the end-of-response marker; when
    too long the prompt loses tokens from its left, the continuation from its end).
    """
    from pipeline.data.template import encode_prompt_response

    prompt_ids, cont_ids = encode_prompt_response(tokenizer, prompt, continuation, max_len, add_bos)
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
    """Score each (prompt, continuation): sum and count of continuation-token log-probs, one
    prompt+continuation sequence per pair (any causal LM).

    Requests are sorted by length so each batch pads little; results come back in input order.
    """
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    encoded = [_encode_pair(tokenizer, p, c, max_len) for p, c in pairs]
    with compute_context(model):
        return _score_per_option(model, encoded, pad_token_id(tokenizer), batch_size, desc)


def _score_per_option(model, encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int,
                      desc: str) -> list[ContinuationScore]:
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[ContinuationScore | None] = [None] * len(encoded)
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[lo: lo + batch_size]
        totals = _score_batch(model, [encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad_id)
        for i, total in zip(idx, totals):
            results[i] = ContinuationScore(total, encoded[i][1])
    return results  # type: ignore[return-value]


def score_encoded(model, tokenizer, encoded: list[tuple[list[int], int]], batch_size: int,
                  max_len: int, desc: str = "scoring") -> list[ContinuationScore]:
    """Score already-encoded requests (token ids of prompt+continuation, continuation length):
    packed (each prompt once) where the model supports it, else one sequence per request with a
    logged note. Both give the same scores to float rounding (tests/unit/test_eval_scoring_fast.py)."""
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    if not encoded:
        return []
    pad_id = pad_token_id(tokenizer)
    reason = packed_unsupported_reason(model)
    with compute_context(model):
        if reason is None:
            return _score_packed(model, encoded, pad_id, batch_size, max_len, desc)
        print(f"note: {desc}: per-option scoring (slower, same scores): {reason}", flush=True)
        return _score_per_option(model, encoded, pad_id, batch_size, desc)


def score_pairs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, max_len: int,
                desc: str = "scoring", add_bos: bool = True) -> list[ContinuationScore]:
    """(prompt, continuation) pairs in the training template (continuation + eos), scored by
    `score_encoded`: the evaluation's one scoring entry point. `add_bos=False` for prompts that
    carry their own special tokens (a chat template's rendering: pipeline.eval.prompts)."""
    return score_encoded(model, tokenizer, [_encode_pair(tokenizer, p, c, max_len, add_bos) for p, c in pairs],
                         batch_size, max_len, desc)


def pad_token_id(tokenizer) -> int:
    """The pad id, falling back to EOS then UNK (padding is masked, so any id is safe)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has no pad, eos or unk token: cannot pad batches")


# ---- packed scoring: each prompt once, its options packed after it -------------------------
#
# A packed row is [prompt, option 1, option 2, ...]. A 4-D attention mask lets every option see
# the prompt and its own earlier tokens only, and position ids restart after the prompt for each
# option, so each option is computed exactly as in its own [prompt, option] sequence (the MoE
# routes token by token, so packing does not change routing either). The template header that all
# prompts of a batch start with runs once, its KV cache repeated per row; the LM head runs on the
# scored positions only.

@dataclass
class PackedRow:
    """ids = the prompt, then every option but its last token: nothing reads the hidden state of
    an option's last token (it predicts nothing scored, and other options never attend to it)."""
    ids: list[int]
    prefix_len: int
    spans: list[tuple[int, int, list[int]]]  # (request index, start in ids, option ids) per option


def _pack_rows(encoded: list[tuple[list[int], int]], cap: int) -> list[PackedRow]:
    """Group requests by identical prompt ids (truncation can differ per option) and pack each
    group's options after one copy of the prompt, starting a new row past `cap` tokens."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, n_cont) in enumerate(encoded):
        groups.setdefault(tuple(seq[: len(seq) - n_cont]), []).append(i)
    rows: list[PackedRow] = []
    for prefix, members in groups.items():
        row = None
        for i in members:
            seq, n_cont = encoded[i]
            if row is None or (row.spans and len(row.ids) + n_cont - 1 > cap):
                row = PackedRow(list(prefix), len(prefix), [])
                rows.append(row)
            option = seq[len(seq) - n_cont:]
            row.spans.append((i, len(row.ids), option))
            row.ids += option[:-1]
    return rows


def shared_prefix_len(rows: list[PackedRow]) -> int:
    """Tokens every row's prompt starts with (the template header: bos, "Below is an
    instruction..."), leaving each prompt's last token in its row (its hidden state is scored)."""
    prompts = [r.ids[: r.prefix_len] for r in rows]
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    for k in range(limit):
        if any(p[k] != first[k] for p in prompts):
            return k
    return max(limit, 0)


def _packed_inputs(rows: list[PackedRow], shared: int, pad_id: int, dtype: torch.dtype,
                   device: torch.device):
    """Input ids and position ids of the left-padded rows without their `shared` first tokens
    (those come from the KV cache), and the additive 4-D mask [B, 1, W, shared + W], on `device`
    (the mask is built there: it is the largest input)."""
    width = max(len(r.ids) for r in rows) - shared
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)    # -1 pad, 0 prompt, j option j
    for b, r in enumerate(rows):
        off = width - len(r.ids)    # column of row token t is off + t (t < shared: in the cache)
        ids[b, off + shared:] = torch.tensor(r.ids[shared:], dtype=torch.long)
        pos[b, off + shared: off + r.prefix_len] = torch.arange(shared, r.prefix_len)
        seg[b, off + shared: off + r.prefix_len] = 0
        for j, (_, start, option) in enumerate(r.spans, start=1):
            n = len(option) - 1
            pos[b, off + start: off + start + n] = torch.arange(r.prefix_len, r.prefix_len + n)
            seg[b, off + start: off + start + n] = j
    seg = seg.to(device)
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(width, dtype=torch.bool, device=device)   # pad query sees itself: no NaN row
    allowed = torch.cat([allowed.new_ones(len(rows), width, shared), allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids.to(device), pos.to(device), mask[:, None]


def _gather_plan(rows: list[PackedRow], width: int):
    """Flat (row, source column, target id, request) indices of every scored continuation token:
    the hidden state at the source column predicts the target."""
    b_idx, src, tgt, req = [], [], [], []
    for b, r in enumerate(rows):
        off = width - len(r.ids)
        for i, start, option in r.spans:
            # token t of the option is predicted from the token before it; the option's first
            # token from the prompt's last token (options do not see each other)
            n = len(option)
            b_idx += [b] * n
            src += [off + r.prefix_len - 1] + list(range(off + start, off + start + n - 1))
            tgt += option
            req += [i] * n
    return [torch.tensor(x, dtype=torch.long) for x in (b_idx, src, tgt, req)]


# attention implementations that apply an additive 4-D float mask as given
PACKED_ATTENTION = ("sdpa", "eager")
# model types whose logits are exactly `lm_head(model.model(...).last_hidden_state)` (no logit
# scaling or soft-capping): packed scoring runs the LM head on the scored positions only
PACKED_MODEL_TYPES = ("llama", "h3fusion")


# an ensemble (pipeline.ensemble, reached through the loaded model only): `members`, and its
# method's hooks: `routes_per_prompt` -> `choose_for_sequences`, else `mix_target_ll`
ENSEMBLE_MODEL_TYPE = "h3fusion_ensemble"


def _is_ensemble(model) -> bool:
    return getattr(model.config, "model_type", None) == ENSEMBLE_MODEL_TYPE


def packed_unsupported_reason(model) -> str | None:
    """Why packed scoring cannot run on `model`, or None when it can (an ensemble: when every
    member can)."""
    kind = getattr(model.config, "model_type", None)
    if kind == ENSEMBLE_MODEL_TYPE:
        reasons = [packed_unsupported_reason(m) for m in model.members]
        return next((f"ensemble member: {r}" for r in reasons if r is not None), None)
    if kind not in PACKED_MODEL_TYPES:
        return (f"packed scoring supports model types {PACKED_MODEL_TYPES} and ensembles of "
                f"them, got {kind!r}")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        return (f"packed scoring needs a custom 4-D attention mask; attention implementation "
                f"{impl!r} is not one of {PACKED_ATTENTION} (load the model with "
                f"attn_implementation='sdpa')")
    return None


def _check_packable(model) -> None:
    reason = packed_unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"{reason} (use score_continuations)")


# scored positions per LM-head call: bounds the [rows, vocab] logits (a 49k vocab -> 13 MB in
# float32) so they stay cache-friendly on CPU and small on GPU
_HEAD_CHUNK = 64


def _token_log_likelihoods(lm_head, hidden_NH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Log-probs of the targets; the LM head runs in its weights' dtype outside any autocast (CPU
    bf16 evaluation: fp32, a third less log-likelihood error than bf16 logits on SmolLM2)."""
    out = []
    hidden_NH = hidden_NH.to(lm_head.weight.dtype)
    for lo in range(0, hidden_NH.shape[0], _HEAD_CHUNK):
        with torch.autocast(hidden_NH.device.type, enabled=False):
            logits = lm_head(hidden_NH[lo: lo + _HEAD_CHUNK]).float()
        # log_softmax in float32 as in `_score_batch`: the same normaliser reduction over the
        # vocab, so both paths round alike (logsumexp differs by ~1e-5 per token on a 49k vocab)
        tgt = targets_N[lo: lo + _HEAD_CHUNK, None]
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, tgt)[:, 0])
    return torch.cat(out)


@torch.no_grad()
def _packed_token_ll(model, rows: list[PackedRow], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of every scored continuation token, its request index) for one Llama-layout model."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    shared = shared_prefix_len(rows)
    cache = None
    if shared:   # the rows' common template header: run once, its KV cache repeated per row
        head_ids = torch.tensor([rows[0].ids[:shared]], dtype=torch.long, device=device)
        cache = model.model(input_ids=head_ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(rows))
    ids, pos, mask = _packed_inputs(rows, shared, pad_id, dtype, device)
    hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=mask,
                         past_key_values=cache).last_hidden_state
    b_idx, src, tgt, req = (t.to(device) for t in _gather_plan(rows, ids.shape[1]))
    return _token_log_likelihoods(model.lm_head, hidden[b_idx, src], tgt), req


@torch.no_grad()
def _score_packed_batch(model, rows: list[PackedRow], pad_id: int) -> dict[int, float]:
    if _is_ensemble(model):
        # a mixing ensemble: its method mixes the members' log-probs of the targets (every
        # member's softmax is normalised alone)
        per_member = [_packed_token_ll(m, rows, pad_id) for m in model.members]
        req = per_member[0][1]
        token_ll = model.mix_target_ll([ll for ll, _ in per_member])
    else:
        token_ll, req = _packed_token_ll(model, rows, pad_id)
    totals = torch.zeros(int(req.max()) + 1, dtype=torch.float64, device=token_ll.device)
    totals.index_add_(0, req, token_ll.double())
    totals_list = totals.tolist()                            # one device sync per batch
    return {i: totals_list[i] for i in set(req.tolist())}


# a packed row (prompt + options) holds up to this many times max_len tokens: TruthfulQA's
# ~10 options then fit after one prompt, while a batch stays within the token budget below
PACK_ROW_FACTOR = 4


def packed_batches(rows: list[PackedRow], budget: int) -> list[list[PackedRow]]:
    """Rows longest first, grouped so that rows x padded width <= `budget` tokens (at least one
    row per batch): the same activation memory as a per-option batch of budget tokens."""
    rows = sorted(rows, key=lambda r: -len(r.ids))
    batches: list[list[PackedRow]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0].ids) <= budget:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def pack_requests(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int):
    """(encoded requests, packed rows) exactly as `score_continuations_packed` builds them."""
    encoded = [_encode_pair(tokenizer, p, c, max_len) for p, c in pairs]
    return encoded, _pack_rows(encoded, PACK_ROW_FACTOR * max_len)


def score_continuations_packed(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int,
                               max_len: int, desc: str = "scoring") -> list[ContinuationScore]:
    """Drop-in for `score_continuations` (same arguments, same results to float rounding) that
    runs each distinct prompt once with its continuations packed after it, batched across prompts.

    Same tokens (and truncation) as the per-option path. A batch holds at most
    `batch_size * max_len` tokens (the per-option path's largest batch), as several packed rows.
    Model types in PACKED_MODEL_TYPES (dense Llama, H3Fusion) with attention `sdpa` or `eager`
    (a custom 4-D mask), and ensembles of them; anything else is an error naming the type.
    """
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    if not pairs:
        return []
    _check_packable(model)
    encoded = [_encode_pair(tokenizer, p, c, max_len) for p, c in pairs]
    with compute_context(model):
        return _score_packed(model, encoded, pad_token_id(tokenizer), batch_size, max_len, desc)


def _score_packed(model, encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int,
                  max_len: int, desc: str) -> list[ContinuationScore]:
    if _is_ensemble(model) and model.routes_per_prompt:
        return _score_packed_routed(model, encoded, pad_id, batch_size, max_len, desc)
    rows = _pack_rows(encoded, PACK_ROW_FACTOR * max_len)
    results: list[ContinuationScore | None] = [None] * len(encoded)
    for batch in tqdm(packed_batches(rows, batch_size * max_len), desc=desc, leave=False):
        for i, total in _score_packed_batch(model, batch, pad_id).items():
            results[i] = ContinuationScore(total, encoded[i][1])
    return results  # type: ignore[return-value]


def _score_packed_routed(model, encoded: list[tuple[list[int], int]], pad_id: int,
                         batch_size: int, max_len: int, desc: str) -> list[ContinuationScore]:
    """A per-prompt ensemble (router, oracle): each request goes to the member its prompt chooses, each
    member scores its requests packed. The choice reads the request's prompt part (its tokens
    before the continuation): for an Alpaca prompt the same window as its forward finds on the
    whole sequence (the prompt ends with the response marker); for an lm-eval harness request,
    which has no marker, it keeps the answer out of the choice."""
    choice = model.choose_for_sequences([seq[:len(seq) - n] for seq, n in encoded])
    results: list[ContinuationScore | None] = [None] * len(encoded)
    for m in sorted(set(choice)):
        idx = [i for i, c in enumerate(choice) if c == m]
        scores = _score_packed(model.members[m], [encoded[i] for i in idx], pad_id, batch_size,
                               max_len, f"{desc} [{model.config.member_names[m]}]")
        for i, score in zip(idx, scores):
            results[i] = score
    return results  # type: ignore[return-value]

"""The router ensemble's prompt classifier and the prompt/response boundary in token ids.

Classifier: multinomial logistic regression on the prompt's bag of token ids (token counts
divided by the L2 norm of the count vector, so long and short prompts are on one scale). Its
parameters are one [vocab, C] table and a [C] bias: a prompt's logits are the feature-weighted
sum of its tokens' rows plus the bias. Trained full-batch with L-BFGS in float64 from zeros on
CPU, so the same rows give the same weights.

Boundary: the scored/generated sequences are `bos + Alpaca prompt + response` (pipeline.data.
template). The prompt always ends with the response marker ("### Response:\\n"); its token ids
are read off the tokenizer (`response_marker_ids`). The classifier sees the tokens up to the
FIRST occurrence of the marker. The prompt holds the marker at its end, so the first occurrence
ends inside the prompt: no answer token (appended after it) can move it or be seen. It sees
the last PROMPT_WINDOW tokens of the prompt only, so that a long answer, which makes the scorer
drop prompt tokens from the left, does not change them either (see PROMPT_WINDOW).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

# prompt tokens the classifier sees (the last ones, marker included). A scored sequence that is
# too long loses prompt tokens from its left but keeps at least ceil(max_len / 2) of them
# (pipeline.data.template.encode_prompt_response), so with eval.max_seq_len >= 2 * PROMPT_WINDOW
# the window, and the chosen expert, never depend on the answer's length either.
PROMPT_WINDOW = 64
# the classifier's L2 strength: fixed a priori (not tuned on dev, so dev accuracy is held out)
L2 = 1e-3
MAX_ITER = 200


def _common_suffix(seqs: list[list[int]]) -> list[int]:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[len(s) - 1 - n] for s in seqs}) == 1:
        n += 1
    return seqs[0][len(seqs[0]) - n:] if n else []


def response_marker_ids(tokenizer) -> list[int]:
    """Token ids every encoded Alpaca prompt ends with (the response marker as it is tokenized
    in context): the common suffix of probe prompts that differ in their last characters."""
    from pipeline.data.template import format_prompt

    probes = [format_prompt("Say a", ""), format_prompt("Why b?", ""),
              format_prompt("Add 1", "x 9."), format_prompt("Name c!", "y z")]
    marker = _common_suffix([tokenizer.encode(p, add_special_tokens=False) for p in probes])
    if len(marker) < 2:
        raise ValueError(f"tokenizer: could not find the response marker's token ids (common "
                         f"suffix of templated prompts is {marker})")
    return marker


def prompt_end(ids: Sequence[int], marker: Sequence[int]) -> int | None:
    """Index just past the first occurrence of `marker` in `ids`, or None."""
    m = len(marker)
    first = marker[0]
    for i in range(len(ids) - m + 1):
        if ids[i] == first and list(ids[i: i + m]) == list(marker):
            return i + m
    return None


def prompt_tokens(ids: Sequence[int], marker: Sequence[int], window: int = PROMPT_WINDOW) -> list[int]:
    """The tokens the classifier sees: the last `window` tokens up to the first marker (up to
    the end of `ids` when there is none: a sequence not in the template, which the evaluation
    never builds)."""
    if window < 1:
        raise ValueError(f"prompt window must be >= 1, got {window}")
    end = prompt_end(ids, marker)
    end = len(ids) if end is None else end
    return list(ids[max(0, end - window): end])


# encode a prompt without truncation: the window is the prompt's end either way
NO_LIMIT = 1 << 30


def item_prompt_window(tokenizer, marker: Sequence[int], item: dict,
                       window: int = PROMPT_WINDOW) -> list[int]:
    """The window a per-prompt ensemble sees of an eval item's Alpaca prompt (as the evaluation
    encodes it: bos + prompt; the window is its end, whatever truncation keeps of its left)."""
    from pipeline.data.template import encode_prompt_response, format_prompt

    ids = encode_prompt_response(tokenizer, format_prompt(item["instruction"], item["input"]),
                                 None, NO_LIMIT)[0]
    return prompt_tokens(ids, marker, window)


class PromptClassifier:
    """Logistic regression over bag-of-token-ids; `weight` [vocab, C], `bias` [C] (float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise ValueError(f"classifier: weight [vocab, C] and bias [C] expected, got "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        self.weight, self.bias = weight.float(), bias.float()

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    def logits(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        rows, flat, w = _flatten(prompts, self.weight.shape[0])
        out = torch.zeros(len(prompts), self.num_classes, dtype=self.weight.dtype)
        out.index_add_(0, rows, self.weight[flat] * w[:, None].to(self.weight.dtype))
        return out + self.bias

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        return self.logits(prompts).argmax(dim=-1).tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}


def _flatten(prompts: Sequence[Sequence[int]], vocab: int):
    """(row index, token id, weight) per token of every prompt."""
    rows, flat, w = [], [], []
    for r, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"classifier: prompt {r} has no tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"classifier: prompt {r} has token ids outside the vocab ({vocab}): {bad[:5]}")
        # every occurrence adds 1/|c|: a token's feature is its count over the L2 norm of the
        # prompt's count vector, so long and short prompts are on one scale
        counts = Counter(ids)
        norm = math.sqrt(sum(c * c for c in counts.values()))
        rows += [r] * len(ids)
        flat += list(ids)
        w += [1.0 / norm] * len(ids)
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(flat, dtype=torch.long),
            torch.tensor(w, dtype=torch.float64))


def train_classifier(prompts: Sequence[Sequence[int]], labels: Sequence[int], num_classes: int,
                     vocab: int) -> PromptClassifier:
    """Fit the L2-regularised multinomial logistic regression (mean cross-entropy + L2/2 |W|^2)."""
    if len(prompts) != len(labels) or not prompts:
        raise ValueError(f"classifier: {len(prompts)} prompts and {len(labels)} labels")
    if any(not 0 <= y < num_classes for y in labels):
        raise ValueError(f"classifier: labels must be in [0, {num_classes})")
    rows, flat, w = _flatten(prompts, vocab)
    y = torch.tensor(list(labels), dtype=torch.long)
    weight = torch.zeros(vocab, num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITER, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.zeros(len(prompts), num_classes, dtype=torch.float64)
        logits = logits.index_add(0, rows, weight[flat] * w[:, None]) + bias
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return PromptClassifier(weight.detach().float(), bias.detach().float())

"""The Alpaca prompt template and SFT tokenisation (labels only on the response + eos).

Every stage that builds a prompt uses `format_prompt` and `encode_prompt_response`, so training,
likelihood scoring and generation see the exact same token boundaries.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (Alpaca's field name)
    """The Alpaca prompt; the "### Input" block only when `input` is non-empty."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _require_special(tokenizer: Any, name: str) -> int:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    if tid is None:
        raise ValueError(f"tokenizer has no {name}_token (needed for SFT: eos ends a response, pad pads)")
    return int(tid)


def encode_prompt_response(tokenizer: Any, prompt: str, response: str | None,
                           max_len: int, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with bos before the prompt and eos after the response.

    Truncation keeps the END of the prompt (the "### Response:" marker, and bos is then lost) and
    the START of the response, giving the response at least max_len // 2 tokens; a response cut
    by `max_len` loses its eos. `response=None` gives a generation prompt. `add_bos=False`: the
    prompt is encoded exactly as written (a chat template's rendering, which writes its own
    special tokens: pipeline.eval.prompts).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    eos = _require_special(tokenizer, "eos")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    prompt_ids = ([bos] if bos is not None else []) + tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = [] if response is None else tokenizer.encode(response, add_special_tokens=False) + [eos]
    # Over budget: the response keeps up to half of max_len (more if the prompt is short).
    keep_response = min(len(response_ids), max(max_len - len(prompt_ids), max_len // 2))
    keep_prompt = min(len(prompt_ids), max_len - keep_response)
    return prompt_ids[len(prompt_ids) - keep_prompt:], response_ids[:keep_response]


def normalize_task_label(label: Sequence[float], where: str = "task_label",
                         width: Optional[int] = None) -> list[float]:
    """A soft task vector (one weight per dimension, in the run's `dimensions` order;
    non-negative, sums to 1); mixed intents keep several > 0. `width`: the expected length."""
    vec = [float(x) for x in label]
    if not vec or (width is not None and len(vec) != width) or any(x < 0 for x in vec) or sum(vec) <= 0:
        raise ValueError(f"{where}: expected {width or 'one or more'} non-negative weights with a "
                         f"positive sum (one per dimension), got {list(label)}")
    total = sum(vec)
    return [x / total for x in vec]


def tokenize_sft(examples: dict, tokenizer: Any, max_len: int, padding: bool = False) -> dict:
    """Batched `Dataset.map` function: columns instruction/input/response/task_label ->
    input_ids, attention_mask, labels (-100 on prompt and padding), task_label (soft, normalised).

    `padding=True` pads every row to `max_len` (right side, pad_token_id); otherwise rows keep
    their length and `SFTCollator` pads per batch.
    """
    pad = _require_special(tokenizer, "pad") if padding else None
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "task_label": []}
    inputs = examples.get("input") or [""] * len(examples["instruction"])
    for i, (instr, inp, resp) in enumerate(zip(examples["instruction"], inputs, examples["response"])):
        p_ids, r_ids = encode_prompt_response(tokenizer, format_prompt(instr, inp or ""), resp, max_len)
        ids = p_ids + r_ids
        labels = [IGNORE_INDEX] * len(p_ids) + list(r_ids)
        mask = [1] * len(ids)
        if padding:
            n_pad = max_len - len(ids)
            ids, labels, mask = ids + [pad] * n_pad, labels + [IGNORE_INDEX] * n_pad, mask + [0] * n_pad
        out["input_ids"].append(ids)
        out["attention_mask"].append(mask)
        out["labels"].append(labels)
        out["task_label"].append(normalize_task_label(examples["task_label"][i], f"task_label of row {i}",
                                                       len(examples["task_label"][0])))
    return out

"""Alpaca template, SFT tokenisation (labels, eos, truncation, padding) and the collator."""
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.data.collate import SFTCollator
from pipeline.data.template import (IGNORE_INDEX, encode_prompt_response, format_prompt, normalize_task_label,
                                    tokenize_sft)


@pytest.fixture(scope="module")
def tok(tiny_run):
    return AutoTokenizer.from_pretrained(str(tiny_run.tokenizer))


def test_format_prompt_with_and_without_input():
    no_input = format_prompt("Add 2 and 3.")
    assert no_input.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n") and "### Input" not in no_input
    with_input = format_prompt("Sort these.", "3, 1")
    assert "### Input:\n3, 1\n\n### Response:\n" in with_input and "paired with an input" in with_input
    assert format_prompt("x", "   ") == format_prompt("x")


def _batch(**cols):
    n = len(cols["instruction"])
    cols.setdefault("input", [""] * n)
    cols.setdefault("task_label", [[1.0, 0.0, 0.0]] * n)
    return cols


def test_labels_mask_prompt_and_end_with_eos(tok):
    out = tokenize_sft(_batch(instruction=["What is 2 + 3?"], response=["The answer is 5."]), tok, 128)
    ids, labels = out["input_ids"][0], out["labels"][0]
    p_ids, r_ids = encode_prompt_response(tok, format_prompt("What is 2 + 3?"), "The answer is 5.", 128)
    assert ids == p_ids + r_ids and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[:len(p_ids)] == [IGNORE_INDEX] * len(p_ids) and labels[len(p_ids):] == r_ids
    assert tok.decode(r_ids, skip_special_tokens=True) == "The answer is 5."
    assert out["attention_mask"][0] == [1] * len(ids)


def test_truncation_keeps_response_marker_and_padding(tok):
    long_instr = "word " * 200
    out = tokenize_sft(_batch(instruction=[long_instr, "Hi"], response=["Yes.", "Hello there."]), tok, 40, padding=True)
    for ids, labels, mask in zip(out["input_ids"], out["labels"], out["attention_mask"]):
        assert len(ids) == len(labels) == len(mask) == 40
    ids0, labels0 = out["input_ids"][0], out["labels"][0]
    assert "### Response:" in tok.decode(ids0) and ids0[-1] == tok.eos_token_id
    assert sum(l != IGNORE_INDEX for l in labels0) == len(tok.encode("Yes.", add_special_tokens=False)) + 1
    n_real = sum(out["attention_mask"][1])
    assert all(l == IGNORE_INDEX for l in out["labels"][1][n_real:])
    assert all(i == tok.pad_token_id for i in out["input_ids"][1][n_real:])


def test_soft_task_label_normalised_and_checked(tok):
    out = tokenize_sft(_batch(instruction=["a"], response=["b"], task_label=[[1.0, 0.0, 1.0]]), tok, 64)
    assert out["task_label"][0] == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="task_label of row 0"):
        tokenize_sft(_batch(instruction=["a"], response=["b"], task_label=[[0.0, 0.0]]), tok, 64)
    with pytest.raises(ValueError):
        normalize_task_label([-1.0, 1.0, 1.0])


def test_collator_pads_right_and_masks(tok):
    out = tokenize_sft(_batch(instruction=["What is 2 + 3?", "Hi"], response=["The answer is 5.", "Hello."],
                              task_label=[[1, 0, 0], [0, 0.5, 0.5]]), tok, 128)
    rows = [{k: out[k][i] for k in out} for i in range(2)]
    batch = SFTCollator(tok.pad_token_id)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    B, S = 2, max(lengths)
    assert batch["input_ids"].shape == (B, S) and batch["labels"].shape == (B, S)
    assert batch["task_label"].dtype == torch.float32 and batch["task_label"].shape == (2, 3)
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short, min(lengths):].sum() == 0
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, min(lengths):] == tok.pad_token_id).all()
    assert torch.equal(batch["input_ids"][short, :min(lengths)], torch.tensor(rows[short]["input_ids"]))
    with pytest.raises(ValueError, match="lacks"):
        SFTCollator(tok.pad_token_id)([{"input_ids": [1]}])

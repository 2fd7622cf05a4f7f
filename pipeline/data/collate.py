"""Batch collation for SFT: right-pad to the longest row, labels -100 on padding."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .template import IGNORE_INDEX


class SFTCollator:
    """list of tokenized rows (from `tokenize_sft`) -> dict of tensors
    input_ids [B,S] long, attention_mask [B,S] long, labels [B,S] long, task_label [B,E] float."""

    def __init__(self, pad_token_id: int, max_len: int | None = None):
        if pad_token_id is None:
            raise ValueError("SFTCollator needs a pad_token_id (the tokenizer's pad token)")
        self.pad_token_id = int(pad_token_id)
        self.max_len = max_len

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("SFTCollator got an empty batch")
        for i, r in enumerate(rows):
            missing = [k for k in ("input_ids", "labels", "task_label") if k not in r]
            if missing:
                raise ValueError(f"SFTCollator: row {i} lacks {missing} (run tokenize_sft first)")
        seq = max(len(r["input_ids"]) for r in rows)
        if self.max_len is not None:
            seq = min(seq, self.max_len)
        ids = torch.full((len(rows), seq), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), seq), dtype=torch.long)
        for i, r in enumerate(rows):
            n = min(len(r["input_ids"]), seq)
            ids[i, :n] = torch.as_tensor(list(r["input_ids"][:n]), dtype=torch.long)
            labels[i, :n] = torch.as_tensor(list(r["labels"][:n]), dtype=torch.long)
            row_mask = r.get("attention_mask")
            mask[i, :n] = torch.as_tensor(list(row_mask[:n]), dtype=torch.long) if row_mask is not None else 1
        task_label = torch.tensor([list(r["task_label"]) for r in rows], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_label": task_label}

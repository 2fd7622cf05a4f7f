"""Fusion training data: the mixed HHH SFT rows, tokenized, and rank-local micro batches.

The order is `pipeline.train.common.BatchSchedule`: a pure function of (seed, optimizer step,
micro step, rank), so resuming at step s sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ...config import PipelineConfig, TrainConfig
from ...io_utils import read_json


def load_fusion_rows(cfg: PipelineConfig, tokenizer_dir: Path, data_dir: Path) -> list[dict]:
    """`<run>/data` train split mixed by `fusion.mix_weights`, tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    from ...data.loading import load_mixed_sft
    from ...data.template import tokenize_sft

    ds = load_mixed_sft(data_dir, "train", cfg.fusion.mix_weights, cfg.fusion.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    keep = ("input_ids", "attention_mask", "labels", "task_label")
    tokenized = ds.map(tokenize_sft, batched=True, keep_in_memory=True,
                       fn_kwargs={"tokenizer": tokenizer, "max_len": cfg.fusion.train.max_seq_len},
                       remove_columns=[c for c in ds.column_names if c not in keep])
    return [dict(r) for r in tokenized]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in _TOKENIZER_FILES)


def pad_token_id(model_dir: Path) -> int:
    """The fused model's pad id: its tokenizer's when the dir has one, else config.json's, else 0."""
    if has_tokenizer(model_dir):
        from transformers import AutoTokenizer
        pad = AutoTokenizer.from_pretrained(str(model_dir)).pad_token_id
        if pad is not None:
            return int(pad)
    pad = read_json(model_dir / "config.json").get("pad_token_id")
    return pad if isinstance(pad, int) else 0


class MicroBatches:
    """Rank-local, collated micro batches of `common.BatchSchedule`'s global seeded order."""

    def __init__(self, rows: Sequence[dict[str, Any]], train: TrainConfig, rank: int,
                 world_size: int, model_dir: Path):
        from ...data.collate import SFTCollator
        from ..common import BatchSchedule

        self.rows, self.train, self.rank = rows, train, rank
        self.schedule = BatchSchedule(len(rows), train.micro_batch_size, train.grad_accum_steps,
                                      world_size, train.seed)
        self.schedule.check("fusion training data")
        self.total_steps = self.schedule.total_steps(train)
        self.collate = SFTCollator(pad_token_id(model_dir), max_len=train.max_seq_len)

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self.collate([self.rows[i] for i in self.schedule.indices(step, micro, self.rank)])

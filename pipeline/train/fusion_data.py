"""Fusion training data: the mixed HHH SFT rows, tokenized, and a deterministic batch schedule.

The schedule is a pure function of (seed, optimizer step, micro step, rank): epoch e uses the
permutation `randperm(n, seed + e)`, and optimizer step s of that epoch takes the next
`micro_batch * world * grad_accum` rows, rank r its own `micro_batch`-row slice of each micro
step. Resuming at step s therefore sees exactly the batches an uninterrupted run would have.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import PipelineConfig, TrainConfig


def load_fusion_rows(cfg: PipelineConfig, tokenizer_dir: Path, data_dir: Path) -> list[dict]:
    """`<run>/data` train split mixed by `fusion.mix_weights`, tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    from ..data.loading import load_mixed_sft
    from ..data.template import tokenize_sft

    ds = load_mixed_sft(data_dir, "train", cfg.fusion.mix_weights, cfg.fusion.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    keep = ("input_ids", "attention_mask", "labels", "task_label")
    tokenized = ds.map(tokenize_sft, batched=True, keep_in_memory=True,
                       fn_kwargs={"tokenizer": tokenizer, "max_len": cfg.fusion.train.max_seq_len},
                       remove_columns=[c for c in ds.column_names if c not in keep])
    return [dict(r) for r in tokenized]


def pad_token_id(tokenizer_dir: Path) -> int:
    """The fused model's pad id: from its tokenizer if it has one, else its config, else 0."""
    for name in ("tokenizer_config.json", "config.json"):
        path = tokenizer_dir / name
        if path.is_file():
            import json
            value = json.loads(path.read_text()).get("pad_token_id")
            if isinstance(value, int):
                return value
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
    except (OSError, ValueError):
        pass
    return 0


class MicroBatches:
    """Rank-local micro batches of the global, seeded schedule (see module docstring)."""

    def __init__(self, rows: Sequence[dict[str, Any]], train: TrainConfig, rank: int,
                 world_size: int, model_dir: Path):
        from ..data.collate import SFTCollator

        self.rows, self.train, self.rank, self.world = rows, train, rank, world_size
        self.rows_per_step = train.micro_batch_size * world_size * train.grad_accum_steps
        if len(rows) < self.rows_per_step:
            raise ValueError(f"training data has {len(rows)} rows, fewer than one optimizer step "
                             f"needs (micro_batch_size {train.micro_batch_size} x world {world_size} "
                             f"x grad_accum_steps {train.grad_accum_steps} = {self.rows_per_step})")
        self.steps_per_epoch = len(rows) // self.rows_per_step
        self.collate = SFTCollator(pad_token_id(model_dir), max_len=train.max_seq_len)
        self._perm_epoch, self._perm = -1, None

    @property
    def total_steps(self) -> int:
        if self.train.max_steps > 0:
            return self.train.max_steps
        return max(1, math.ceil(self.train.epochs * self.steps_per_epoch))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.train.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.rows), generator=gen), epoch
        return self._perm

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        micro_bs = self.train.micro_batch_size
        start = ((step_in_epoch * self.train.grad_accum_steps + micro) * self.world + self.rank) * micro_bs
        return self.collate([self.rows[int(i)] for i in perm[start:start + micro_bs]])

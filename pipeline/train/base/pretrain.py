"""Pre-training of the tiny base Llama (`h3fusion base` without `base.path`/`base.gguf`):
pack the corpus into blocks, then the shared `loop.TrainLoop` on a plain-torch engine (no
DeepSpeed, one process), warmup + cosine to 10%.
"""
from __future__ import annotations

import math
import time
from functools import partial

import torch

from ...config import TrainConfig
from ..common import warmup_cosine
from ..grad_checkpointing import prepare_for_training
from ..loop import LoopSettings, TorchEngine, TrainLoop
from ..mixed_precision import TrainPrecision

PRECISION_KEY = "base.train.precision"


def base_precision(train: TrainConfig) -> TrainPrecision:
    """`base.train.precision` resolved for the CPU, where the tiny base always trains (bf16 on a
    CPU without bf16 instructions: one ValueError)."""
    return TrainPrecision.resolve(PRECISION_KEY, train.precision, "cpu")


def pack_blocks(texts, tokenizer, block_len: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` documents and cut into [N, block_len] (the tail is dropped)."""
    stream: list[int] = []
    for text in texts:
        stream += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // block_len
    if n < 2:
        raise ValueError(f"pretrain corpus too small: {len(stream)} tokens < 2 blocks of {block_len}")
    return torch.tensor(stream[:n * block_len], dtype=torch.long).view(n, block_len)


def lr_at(step: int, total: int, train: TrainConfig) -> float:
    """Linear warmup to train.lr (from lr/warmup at step 0), then cosine decay to 10% of it."""
    return warmup_cosine(step, total, train.warmup_steps, peak=train.lr, floor=0.1,
                         warmup_offset=1)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch)]
    model.train()
    return float(sum(losses) / len(losses))


class PretrainTask:
    """The base's pieces for `loop.TrainLoop`: seeded reshuffled blocks (a fresh permutation
    whenever the current one cannot fill a micro batch), the causal-LM loss, a log line."""

    def __init__(self, blocks: torch.Tensor, train: TrainConfig, total: int, log):
        self.blocks, self.train, self.total, self.log = blocks, train, total, log
        self.gen = torch.Generator().manual_seed(train.seed)
        self.order, self.cursor = torch.randperm(len(blocks), generator=self.gen), 0
        self.last_loss = float("nan")

    def batch(self, step: int, micro: int) -> dict:
        size = self.train.micro_batch_size
        if self.cursor + size > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.blocks), generator=self.gen), 0
        batch = self.blocks[self.order[self.cursor:self.cursor + size]]
        self.cursor += size
        return {"input_ids": batch}

    def loss(self, engine, batch: dict):
        loss = engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return loss, {"ce": loss}

    def observe(self, batch: dict, terms: dict) -> None:
        pass   # the base logs only the last micro batch's loss

    def end_step(self, loop: TrainLoop, micro_losses: list[float], step_s: float) -> None:
        self.last_loss, step, every = micro_losses[-1], loop.step - 1, self.train.log_every
        if every > 0 and (step % every == 0 or step == self.total - 1):
            self.log(f"base step {step + 1}/{self.total} loss {self.last_loss:.4f} "
                     f"lr {loop.engine.lr():.2e}")
        return None

    def client_state(self) -> dict:
        return {}

    def restore(self, client_state: dict) -> None:
        pass   # the base run is short and never checkpoints


def pretrain(model, blocks: torch.Tensor, train: TrainConfig, log=print,
             precision: TrainPrecision | None = None) -> dict:
    """Single process, no DeepSpeed: AdamW (betas 0.9/0.95), grad clipping, `lr_at` schedule,
    the forward in `precision` (default: `base_precision(train)`; the before/after eval losses
    are fp32); returns step count, losses, wall time and the precision record."""
    precision = precision or base_precision(train)
    n_eval = max(1, len(blocks) // 20)
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]
    per_step = train.micro_batch_size * train.grad_accum_steps
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.epochs * len(train_blocks) / per_step))
    prepare_for_training(model, train.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    engine = TorchEngine(model, opt, partial(lr_at, total=total, train=train),
                         train.grad_accum_steps, train.grad_clip, autocast=precision.autocast)
    loss_before = mean_loss(model, eval_blocks, train.micro_batch_size)
    t0, task = time.time(), PretrainTask(train_blocks, train, total, log)
    TrainLoop(engine, task, LoopSettings(total_steps=total, grad_accum_steps=train.grad_accum_steps,
                                         desc="base")).run()
    return {"steps": total, "loss_before": loss_before, "loss_after": mean_loss(model, eval_blocks, train.micro_batch_size),
            "last_train_loss": task.last_loss, "train_wall_s": round(time.time() - t0, 3),
            "train_blocks": len(train_blocks), "eval_blocks": n_eval, "block_len": blocks.shape[1],
            "precision": precision.record()}

"""Training-loop pieces shared by the trainers (expert fine-tuning, fusion).

- `seed_everything` / `rng_state` / `restore_rng_state`: reproducible runs and exact resume.
- `BatchSchedule`: a deterministic global data order (seeded permutation per epoch) that maps an
  optimizer step + micro index + rank to row indices, so the resume position is just a step.
- `warmup_cosine`: the one LR schedule (linear warmup, cosine decay to a floor).
- `comm_device` / `sum_over_ranks` / `max_over_ranks` / `reduce_over_ranks`: every
  collective the trainers run, on a tensor on the communication device (NCCL: CUDA only).
- `RankZeroLog`: TensorBoard scalars + tqdm bar on rank 0 only; `Throughput`: tokens/s.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import TrainConfig


def seed_everything(seed: int) -> None:
    """Python/NumPy/torch RNGs. Trainers use the same seed on every rank so that parameters
    created outside DeepSpeed (e.g. LoRA adapters) start identical everywhere."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's RNG states for a checkpoint: Python, NumPy, torch CPU and, where CUDA is
    available, the CUDA generator of every local device (`cuda`: one state per device, in
    device order; dropout on GPU draws from these)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[dict]) -> None:
    """Give back what `rng_state` saved. A checkpoint from before the CUDA states (or from a CPU
    run) restores the rest; a warning says when the CUDA streams cannot be given back exactly."""
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    _restore_cuda_rng(state.get("cuda"))


def _restore_cuda_rng(saved: Optional[list]) -> None:
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved is None:
        if here:
            warnings.warn("checkpoint holds no CUDA RNG states (saved on CPU or by an older "
                          "version): GPU random streams (dropout) restart from the seed, so this "
                          "resume is not bit-exact", RuntimeWarning, stacklevel=3)
        return
    if here != len(saved):
        warnings.warn(f"checkpoint holds the CUDA RNG states of {len(saved)} device(s), this "
                      f"process sees {here}: restored the first {min(here, len(saved))}; "
                      f"random streams on the others differ, so this resume is not bit-exact",
                      RuntimeWarning, stacklevel=3)
    if here:
        torch.cuda.set_rng_state_all(list(saved)[:here])


@dataclass(frozen=True)
class BatchSchedule:
    """Which rows rank `r` reads for micro batch `m` of optimizer step `s`.

    Each epoch is a permutation seeded by `seed + epoch`; one optimizer step consumes
    `micro * accum * world` consecutive rows of it (a partial step at the end of an epoch is
    dropped). Depends only on (seed, sizes), so a resumed run replays the same order.
    """
    num_rows: int
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    seed: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.rows_per_step

    def check(self, where: str) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{where}: {self.num_rows} rows, fewer than one optimizer step needs "
                f"(micro_batch_size {self.micro_batch_size} x grad_accum_steps "
                f"{self.grad_accum_steps} x world_size {self.world_size} = {self.rows_per_step})")

    def total_steps(self, train: TrainConfig) -> int:
        if train.max_steps > 0:
            return train.max_steps
        return max(1, math.ceil(train.epochs * self.steps_per_epoch))

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=gen)

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = ((step_in_epoch * self.grad_accum_steps + micro) * self.world_size + rank)
        start *= self.micro_batch_size
        return self.permutation(epoch)[start:start + self.micro_batch_size].tolist()


def warmup_cosine(step: int, total: int, warmup: int, peak: float = 1.0, floor: float = 0.0,
                  warmup_offset: int = 0) -> float:
    """LR (or, with peak=1, the multiplier a LambdaLR applies) at optimizer step `step`.

    Linear warmup `peak * (step + warmup_offset) / warmup`, then cosine from `peak` to
    `floor * peak` at `total`. The two parameterisations in use, bit-exact to their old code:
    experts/fusion `(peak=1, floor=0, offset=0)` = transformers' get_cosine_schedule_with_warmup;
    the tiny base `(peak=lr, floor=0.1, offset=1)`. The operation order is part of the contract
    (tests/unit/test_loop.py compares bits), so keep it when editing.
    """
    if step < warmup:
        return peak * (step + warmup_offset) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Throughput:
    """Tokens per second (non-padding tokens, all ranks) between two `rate()` calls."""

    def __init__(self) -> None:
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, attention_mask: torch.Tensor) -> None:
        self.tokens += int(attention_mask.sum())

    def rate(self, sum_over_ranks: Callable[[float], float] = lambda x: x) -> float:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tokens = sum_over_ranks(float(self.tokens))
        self.tokens, self.t0 = 0, time.perf_counter()
        return tokens / elapsed


def comm_device() -> torch.device:
    """Where collective tensors must live: NCCL reduces only CUDA tensors (this rank's device),
    gloo only CPU ones. Every trainer collective goes through the helpers below."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_over_ranks(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A float64 copy of `t` reduced over ranks (SUM or MAX), returned on the CPU; `t` itself
    is untouched. Identity (as float64) in a single process."""
    out = t.detach().to(torch.float64, copy=True)
    if not torch.distributed.is_initialized():
        return out.cpu()
    out = out.to(comm_device())
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(out, op=reduce_op)
    return out.cpu()


def sum_over_ranks(value: float) -> float:
    """Sum a float over ranks (identity in a single process)."""
    return float(reduce_over_ranks(torch.tensor([value], dtype=torch.float64))[0])


def max_over_ranks(value: float) -> float:
    """Max of a float over ranks (identity in a single process)."""
    return float(reduce_over_ranks(torch.tensor([value], dtype=torch.float64), op="max")[0])


class RankZeroLog:
    """TensorBoard event files and a tqdm bar, on rank 0 only (other ranks: no-ops)."""

    def __init__(self, tb_dir: Path, total_steps: int, initial_step: int, enabled: bool,
                 desc: str = "train"):
        self.enabled = enabled
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        Path(tb_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=initial_step or None)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()},
                             refresh=False)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.bar.close()


"""The one training loop, shared by stage 1 (experts), stage 2 (fusion) and base pre-training.

The loop owns what every stage needs the same way: the step counter and history, resume and
checkpoint cadence, the resume-config comparison, stop signals (checkpoint, then "stopped"),
the non-finite-loss guard, the progress bar/TensorBoard writer, and step timing. A stage supplies
a `StageTask` (its data, loss and logging) and an engine:

- `TrainEngine`: forward (`engine(**inputs)`), `backward(loss)` and `step()` once per micro
  batch (the optimizer steps at the accumulation boundary), `lr()`, `grad_norm()`, `module`,
  `device`. `backends.deepspeed_engine.DsEngine` (ZeRO) or `TorchEngine` below (one process).
- `Checkpoints` (optional): `latest()`, `save(tag, client_state, rank_state)`, `load()`;
  `backends.deepspeed_engine.DsCheckpoints`. Without one the loop neither resumes nor saves.

Every decision that must agree across ranks (non-finite loss, stop signal) is reduced over
ranks first (`common.max_over_ranks`, on the communication device), so all ranks raise, save
or stop at the same step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from ..precision import autocast_forward
from .common import RankZeroLog, max_over_ranks, restore_rng_state, rng_state

# may change between a run and its resume (checkpointing changes memory and time, not results)
RESUME_IGNORED = ("log_every", "save_every", "gradient_checkpointing")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops; the message names the step, the first parameter
    holding NaN/inf (if any) and the last checkpoint."""


def first_non_finite_parameter(module: torch.nn.Module) -> Optional[int]:
    """Index (in `named_parameters()` order) of the first parameter of this rank holding NaN/inf,
    or None. Under ZeRO-3 a rank holds only its partition of each parameter (`ds_tensor`)."""
    for i, (_, param) in enumerate(module.named_parameters()):
        local = getattr(param, "ds_tensor", param)
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            return i
    return None


def comparable_config(section: dict, precision: Optional[str] = None) -> dict:
    """A stage's config section (as a dict) without the train keys a resume may change, and with
    `train.precision` as resolved on this device (`precision`: "fp32"/"bf16"), so "auto" and
    the precision it means compare equal and a resume in another precision is refused."""
    out = dict(section)
    out["train"] = {k: v for k, v in section["train"].items() if k not in RESUME_IGNORED}
    if precision is not None:
        out["train"]["precision"] = precision
    return out


def with_resolved_precision(saved: Optional[dict], device_type: str) -> Optional[dict]:
    """A saved comparable config from before precisions were resolved (`train.precision`
    absent, or "auto"): "auto" as it resolves on `device_type`, which is what those runs did."""
    train = (saved or {}).get("train")
    if not isinstance(train, dict) or train.get("precision", "auto") != "auto":
        return saved
    from ..precision import resolve_precision
    return {**saved, "train": {**train, "precision": resolve_precision("auto", device_type)}}


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, one level into nested sections (e.g. `train.precision:
    'fp32' -> 'bf16'`)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and not prefix:
            out += config_differences(old, new, f"{key}.")
        else:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


class TrainEngine(Protocol):
    module: torch.nn.Module
    device: torch.device

    def __call__(self, **inputs): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def lr(self) -> float: ...
    def grad_norm(self) -> Optional[float]: ...


class Checkpoints(Protocol):
    dir: Path

    def latest(self) -> Optional[str]: ...
    def save(self, tag: str, client_state: dict, rank_state: Optional[dict]) -> None: ...
    def load(self) -> tuple[str, dict, Optional[dict]]: ...


class StageTask(Protocol):
    """What a stage supplies. `loss` runs the forward pass (it may keep outputs for `observe`)."""

    def batch(self, step: int, micro: int) -> dict: ...
    def loss(self, engine: TrainEngine, batch: dict) -> tuple[torch.Tensor, dict]: ...
    def observe(self, batch: dict, terms: dict) -> None: ...
    def end_step(self, loop: "TrainLoop", micro_losses: list[float],
                 step_s: float) -> Optional[dict]: ...
    def client_state(self) -> dict: ...
    def restore(self, client_state: dict) -> None: ...


class TorchEngine:
    """Plain single-process engine: AdamW-style `optimizer`, loss / accum per micro batch, grad
    clipping, and the LR set to `lr_at(step)` right before each optimizer step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_at: Callable[[int], float], grad_accum_steps: int, grad_clip: float,
                 autocast: Optional[torch.dtype] = None):
        """`autocast`: the forward runs under `torch.autocast` in this dtype (CPU bf16)."""
        self.module, self.optimizer, self.lr_at = model, optimizer, lr_at
        self.autocast = autocast
        self.accum, self.grad_clip = grad_accum_steps, grad_clip
        self.device = next(model.parameters()).device
        self.micro = self.steps = 0
        self._grad_norm: Optional[float] = None

    def __call__(self, **inputs):
        with autocast_forward(self.autocast, self.device.type):
            return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps)
        if self.grad_clip > 0:
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                                   self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> Optional[float]:
        return self._grad_norm


@dataclass
class LoopSettings:
    total_steps: int
    grad_accum_steps: int
    save_every: int = 0                 # 0: checkpoint only at the end (and on a stop signal)
    config_key: str = "config"          # client_state key of the resume-comparable config
    config: Optional[dict] = None       # `comparable_config(...)` of the stage's section
    tb_dir: Optional[Path] = None       # None: no TensorBoard / progress bar
    desc: str = "train"
    rank0: bool = True


class TrainLoop:
    """Runs `task` on `engine` to `settings.total_steps`; `run()` returns "done" or "stopped"."""

    def __init__(self, engine: TrainEngine, task: StageTask, settings: LoopSettings,
                 checkpoints: Optional[Checkpoints] = None, stop=None,
                 on_save: Optional[Callable[["TrainLoop"], None]] = None,
                 on_step_end: Optional[Callable[["TrainLoop"], None]] = None):
        """`on_save(loop)` runs after each mid-run (periodic or stop-signal) checkpoint;
        `on_step_end(loop)` after every optimizer step (history updated, before the stop check)."""
        self.engine, self.task, self.settings = engine, task, settings
        self.checkpoints, self.stop = checkpoints, stop
        self.on_save, self.on_step_end = on_save, on_step_end
        self.step, self.history, self.last_tag, self.resumed_from = 0, [], None, None
        self._start_step = 0   # the step `run()` started at (after a resume: the checkpoint's)
        self.tb = RankZeroLog(Path(), 0, 0, enabled=False)

    @property
    def total_steps(self) -> int:
        return self.settings.total_steps

    # ------------------------------------------------------------------ resume / save
    def resume(self) -> Optional[str]:
        """Restore the latest checkpoint when there is one; returns its tag (or None)."""
        if self.checkpoints is None or self.checkpoints.latest() is None:
            return None
        tag, client, rank_state = self.checkpoints.load()
        self._check_config(tag, client.get(self.settings.config_key))
        self.step, self.history = int(client["step"]), list(client.get("history", []))
        self.task.restore(client)
        restore_rng_state(rank_state)
        self.last_tag = self.resumed_from = tag
        return tag

    def _check_config(self, tag: str, saved: Optional[dict]) -> None:
        now = self.settings.config
        if now is not None and "precision" in now.get("train", {}):
            saved = with_resolved_precision(saved, self.engine.device.type)
        if saved == now:
            return
        diff = config_differences(saved or {}, now or {})
        where = self.checkpoints.dir
        raise ValueError(f"{where}/{tag}: checkpoint was trained with a different config "
                         f"({self.settings.config_key}: {'; '.join(diff)}) than now; use the same "
                         f"config, or delete {where} to start over")

    def checkpoint(self) -> None:
        """All ranks call: save step, history, config and the task's state (+ RNG per rank)."""
        tag = f"step{self.step:07d}"
        client = {"step": self.step, "history": self.history,
                  self.settings.config_key: self.settings.config, **self.task.client_state()}
        self.checkpoints.save(tag, client, rng_state())
        self.last_tag = tag

    # ------------------------------------------------------------------ steps
    def _guard(self, value: float, terms: dict) -> None:
        """All ranks agree whether any rank's loss is non-finite, then all raise together."""
        if max_over_ranks(0.0 if math.isfinite(value) else 1.0) == 0:
            return
        last = (f"{self.checkpoints.dir / self.last_tag}" if self.checkpoints and self.last_tag
                else "none saved yet")
        shown = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
        raise NonFiniteLossError(f"loss is {value} (terms: {shown}) at step {self.step + 1}; "
                                 f"last good checkpoint: {last}; {self._non_finite_weights()}")

    def _non_finite_weights(self) -> str:
        """The first parameter holding NaN/inf on any rank, the same name on every rank (all
        ranks call: one collective), and whether the run started with it."""
        names = [name for name, _ in self.engine.module.named_parameters()]
        mine = first_non_finite_parameter(self.engine.module)
        first = int(-max_over_ranks(-float(len(names) if mine is None else mine)))
        if first >= len(names):
            return "every parameter is finite (the non-finite values arise in the forward pass)"
        if self.step > self._start_step:
            return f"parameter {names[first]} holds NaN/inf after {self.step} optimizer steps"
        start = f"checkpoint {self.resumed_from}" if self.resumed_from else "the input model"
        return (f"parameter {names[first]} holds NaN/inf already in the weights this run "
                f"started from ({start})")

    def _micro_step(self, micro: int) -> float:
        batch = self.task.batch(self.step, micro)
        loss, terms = self.task.loss(self.engine, batch)
        value = float(loss.detach())
        self._guard(value, terms)
        self.engine.backward(loss)
        self.engine.step()
        self.task.observe(batch, terms)
        return value

    def _stop_requested(self) -> bool:
        from .signals import any_rank_requested

        return self.stop is not None and any_rank_requested(self.stop.requested, max_over_ranks)

    def run(self) -> str:
        """Train to the last step; "stopped" after a stop signal (checkpoint saved first)."""
        s = self.settings
        self._start_step = self.step
        self.tb = RankZeroLog(s.tb_dir, s.total_steps, self.step, s.rank0 and s.tb_dir is not None,
                              desc=s.desc)
        try:
            while self.step < s.total_steps:
                t0 = time.perf_counter()
                losses = [self._micro_step(m) for m in range(s.grad_accum_steps)]
                self.step += 1
                self.tb.advance()
                row = self.task.end_step(self, losses, time.perf_counter() - t0)
                if row is not None:
                    self.history.append(row)
                if self.on_step_end is not None:
                    self.on_step_end(self)
                stop = self._stop_requested()
                periodic = s.save_every > 0 and self.step % s.save_every == 0 \
                    and self.step < s.total_steps
                if self.checkpoints is not None and (stop or periodic):
                    self.checkpoint()
                    if self.on_save is not None:   # e.g. fusion's consolidated HF snapshot
                        self.on_save(self)
                if stop:
                    return "stopped"
        finally:
            self.tb.close()
        if self.checkpoints is not None:
            self.checkpoint()
        return "done"

    def is_log_step(self, log_every: int) -> bool:
        """Stage 1/2 cadence: every `log_every` optimizer steps (1-based) and the last step."""
        return self.step % max(1, log_every) == 0 or self.step == self.settings.total_steps

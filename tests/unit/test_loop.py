"""pipeline.train.loop and its helpers: the one LR schedule reproduces both old schedules bit for
bit, the plain-torch engine reproduces the old base loop bit for bit, the NaN guard stops stage 1
naming the step and the last checkpoint, and every collective runs on the communication device."""
import ast
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.env import free_port
from pipeline.train import common
from pipeline.train.common import (BatchSchedule, max_over_ranks, reduce_over_ranks,
                                   sum_over_ranks, warmup_cosine)
from pipeline.train.loop import LoopSettings, NonFiniteLossError, TorchEngine, TrainLoop
from pipeline.train.base.pretrain import lr_at, pretrain

TRAIN_DIR = Path(__file__).resolve().parents[2] / "pipeline" / "train"


# ----------------------------------------------------------------------------- LR schedule

def _old_base_lr(step: int, total: int, train: TrainConfig) -> float:
    """pipeline/train/base/stage.py's lr_at before the shared loop (HEAD b7e9bc8), verbatim."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
    return train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@pytest.mark.parametrize("lr", [1e-3, 3e-4, 5e-4, 0.7])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 37), (5, 61), (10, 10), (3, 200)])
def test_base_schedule_is_bit_identical_to_the_old_formula(lr, warmup, total):
    train = TrainConfig(lr=lr, warmup_steps=warmup)
    for step in range(total + 1):
        assert lr_at(step, total, train) == _old_base_lr(step, total, train), step


@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 37), (5, 61), (10, 10), (3, 200)])
def test_expert_fusion_schedule_is_bit_identical_to_transformers(warmup, total):
    from transformers import get_cosine_schedule_with_warmup

    def lrs(make):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out + [sched.get_last_lr()[0]], sched.state_dict()

    ours, ours_state = lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, partial(warmup_cosine, total=total, warmup=warmup)))
    ref, ref_state = lrs(lambda opt: get_cosine_schedule_with_warmup(opt, warmup, total))
    assert ours == ref
    assert ours_state == ref_state   # checkpoints keep the same scheduler state


# ----------------------------------------------------------------------------- plain engine

def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=32))


def _old_pretrain_loop(model, train_blocks, train: TrainConfig, total: int) -> float:
    """The training part of pipeline/train/base/stage.py's pretrain before the shared loop, verbatim."""
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(train.seed)
    order, cursor, train_loss = torch.randperm(len(train_blocks), generator=gen), 0, float("nan")
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = _old_base_lr(step, total, train)
        for _ in range(train.grad_accum_steps):
            if cursor + train.micro_batch_size > len(order):
                order, cursor = torch.randperm(len(train_blocks), generator=gen), 0
            batch = train_blocks[order[cursor:cursor + train.micro_batch_size]]
            cursor += train.micro_batch_size
            loss = model(input_ids=batch, labels=batch).loss
            (loss / train.grad_accum_steps).backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_loss = loss.item()
    return train_loss


def test_base_pretraining_on_the_shared_loop_is_bit_identical_to_the_old_loop():
    blocks = torch.randint(0, 40, (44, 12), generator=torch.Generator().manual_seed(1))
    # 42 train blocks, micro 4 x accum 3: reshuffles mid-step; 9 steps > one epoch
    train = TrainConfig(lr=3e-3, max_steps=9, micro_batch_size=4, grad_accum_steps=3,
                        warmup_steps=2, weight_decay=0.1, grad_clip=0.5, seed=7, log_every=0)
    new, old = _tiny_llama(), _tiny_llama()
    stats = pretrain(new, blocks, train, log=lambda _: None)
    old_last = _old_pretrain_loop(old, blocks[max(1, len(blocks) // 20):], train, stats["steps"])
    assert stats["last_train_loss"] == old_last
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- NaN guard (stage 1)

class _MemoryCheckpoints:
    """In-memory stand-in for DsCheckpoints (the loop's checkpoint interface)."""

    def __init__(self):
        self.dir, self.saved = Path("/ckpts/expert"), {}

    def latest(self):
        return max(self.saved) if self.saved else None

    def save(self, tag, client_state, rank_state):
        self.saved[tag] = client_state

    def load(self):
        tag = self.latest()
        return tag, self.saved[tag], None


def _expert_task(world: int = 1):
    from pipeline.data.collate import SFTCollator
    from pipeline.train.expert.stage import ExpertTask

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 40, (10,), generator=gen).tolist(),
             "labels": torch.randint(1, 40, (10,), generator=gen).tolist(),
             "task_label": [1.0]} for _ in range(16)]
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=2, log_every=1, save_every=2)
    job = SimpleNamespace(rank=0, world_size=world, dimension="honest",
                          cfg=SimpleNamespace(expert=SimpleNamespace(train=train)))
    schedule = BatchSchedule(len(rows), 2, 2, world, seed=3)
    return ExpertTask(job, rows, SFTCollator(0), schedule), train


def test_stage1_nan_loss_stops_naming_step_and_last_checkpoint():
    task, train = _expert_task()
    model = _tiny_llama()
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), lambda s: 1e-3,
                         train.grad_accum_steps, train.grad_clip)
    ckpts = _MemoryCheckpoints()

    def poison(loop):
        if loop.step == 3:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    loop = TrainLoop(engine, task, LoopSettings(total_steps=4, grad_accum_steps=2, save_every=2,
                                                config_key="expert_config", config={"train": {}}),
                     ckpts, on_step_end=poison)
    with pytest.raises(NonFiniteLossError, match=r"at step 4; last good checkpoint: "
                                                 r"/ckpts/expert/step0000002"):
        loop.run()
    assert list(ckpts.saved) == ["step0000002"] and loop.step == 3
    assert [row["step"] for row in loop.history] == [1, 2, 3]
    assert all(math.isfinite(row["train/loss"]) for row in loop.history)


def test_resume_refuses_a_changed_config_but_not_log_or_save_cadence():
    from pipeline.train.loop import comparable_config

    task, train = _expert_task()
    model = _tiny_llama()
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), lambda s: 1e-3, 2, 0)
    ckpts = _MemoryCheckpoints()
    section = {"method": "ffn", "train": {"lr": 1e-3, "log_every": 1, "save_every": 2}}
    settings = LoopSettings(total_steps=2, grad_accum_steps=2, config_key="expert_config",
                            config=comparable_config(section))
    assert TrainLoop(engine, task, settings, ckpts).run() == "done"
    cadence = {**section, "train": {**section["train"], "log_every": 5, "save_every": 0}}
    again = TrainLoop(engine, task, LoopSettings(4, 2, config_key="expert_config",
                                                 config=comparable_config(cadence)), ckpts)
    assert again.resume() == "step0000002" and again.step == 2
    changed = {**section, "train": {**section["train"], "lr": 2e-3}}
    refused = TrainLoop(engine, task, LoopSettings(4, 2, config_key="expert_config",
                                                   config=comparable_config(changed)), ckpts)
    with pytest.raises(ValueError, match=r"different config \(expert_config: train.lr: 0.001 -> 0.002\)"):
        refused.resume()


# ----------------------------------------------------------------------------- collectives

def test_comm_device_is_the_ranks_cuda_device_under_nccl(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert common.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    assert common.comm_device() == torch.device("cpu")


class _Seen(Exception):
    pass


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_collective_helper_uses_the_comm_device(one_process_group, monkeypatch):
    """With the backend pretending to be NCCL, each helper must hand all_reduce a tensor on the
    device `comm_device` chose ("meta" here, so no helper can pass by using the CPU default)."""
    assert sum_over_ranks(2.5) == 2.5 and max_over_ranks(-1.0) == -1.0   # real gloo first
    seen = []

    def fake_all_reduce(tensor, op=None, **kwargs):
        seen.append(tensor.device)
        raise _Seen

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(common, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    from pipeline.train.signals import any_rank_requested
    calls = [lambda: sum_over_ranks(1.0), lambda: max_over_ranks(1.0),
             lambda: reduce_over_ranks(torch.ones(3)),
             lambda: common.Throughput().rate(sum_over_ranks),
             lambda: any_rank_requested(True, max_over_ranks)]
    for call in calls:
        with pytest.raises(_Seen):
            call()
    assert seen == [torch.device("meta")] * len(calls)


def test_training_code_reduces_only_through_the_common_helpers():
    """No module in pipeline/train calls a torch.distributed reduction itself (the old stage 1
    all-reduced a CPU tensor, which NCCL rejects); they all go through common.reduce_over_ranks."""
    offenders = []
    for path in sorted(TRAIN_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("all_reduce", "reduce",
                                                                 "all_reduce_coalesced"):
                if path.name != "common.py":
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []

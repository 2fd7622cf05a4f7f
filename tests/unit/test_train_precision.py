"""`<stage>.train.precision` in training (pipeline/train/mixed_precision.py): CPU bf16 runs the
forward under torch.autocast (the matmuls see bf16) with fp32 parameters, gradients and
optimizer states, a loss close to fp32's; "auto" on the CPU is today's fp32, bit for bit; the
MoE of stage 2 keeps its router and its loss terms in fp32; DeepSpeed's bf16 section follows the
setting; a resume in another precision is refused naming the key; bf16 on a CPU without bf16
instructions is one error before any stage writes anything."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import precision as precision_mod
from pipeline.backends.deepspeed_engine import DsEngine, DsTrainSettings, resolve_ds_config
from pipeline.config import load_config
from pipeline.train.loop import (LoopSettings, TorchEngine, TrainLoop, comparable_config,
                                 config_differences)
from pipeline.train.mixed_precision import TrainPrecision

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
BF16 = TrainPrecision.resolve("expert.train.precision", "bf16", "cuda")   # no CPU probe


def _cpu(name: str) -> TrainPrecision:
    return TrainPrecision("expert.train.precision", name, "cpu",
                          {"auto": "fp32"}.get(name, name))


def _batch(num_experts: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY["vocab_size"], (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "task_label": torch.eye(num_experts)[torch.arange(3) % num_experts]}


def _engine(model, precision: TrainPrecision) -> TorchEngine:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return TorchEngine(model, opt, lambda step: 1e-3, 1, 1.0, autocast=precision.autocast)


def _linear_output_dtypes(model) -> set:
    seen: set = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen


def _llama_step(precision: TrainPrecision):
    """(loss, engine, Linear output dtypes, grad dtypes) of one step on a tiny random Llama."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).train()
    engine = _engine(model, precision)
    seen = _linear_output_dtypes(model)
    batch = _batch()
    loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    engine.backward(loss)
    grads = {p.grad.dtype for p in model.parameters()}
    engine.step()
    return loss, engine, seen, grads


def test_cpu_bf16_step_computes_in_bf16_and_keeps_fp32_masters():
    loss32, _, seen32, _ = _llama_step(_cpu("fp32"))
    loss16, engine, seen16, grads = _llama_step(_cpu("bf16"))
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)       # CE taken in fp32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    assert grads == {torch.float32}
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    states = [t for s in engine.optimizer.state.values() for t in s.values() if t.dim()]
    assert states and {t.dtype for t in states} == {torch.float32}


def test_auto_on_cpu_is_fp32_unchanged():
    auto = TrainPrecision.resolve("base.train.precision", "auto", "cpu")
    assert (auto.resolved, auto.autocast, auto.mode) == ("fp32", None, "fp32")
    loss, _, seen, _ = _llama_step(auto)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**TINY)).train()
    batch = _batch()
    assert seen == {torch.float32}
    assert torch.equal(loss, plain(input_ids=batch["input_ids"], labels=batch["labels"]).loss)


def test_deepspeed_engine_forward_runs_under_the_stages_autocast():
    model = torch.nn.Linear(4, 4)
    raw = type("Raw", (), {"device": torch.device("cpu"), "module": model,
                           "__call__": lambda self, x: model(x)})()
    assert DsEngine(raw, torch.bfloat16)(x=torch.ones(2, 4)).dtype == torch.bfloat16
    assert DsEngine(raw)(x=torch.ones(2, 4)).dtype == torch.float32


def test_fusion_moe_under_cpu_bf16_keeps_router_and_loss_terms_fp32(monkeypatch):
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM, routing, set_trainable
    from pipeline.train.fusion.loop import FusionTask

    expert_inputs: set = set()
    glu = routing.GroupedGLU
    monkeypatch.setattr(routing, "GroupedGLU", SimpleNamespace(
        apply=lambda x, *rest: (expert_inputs.add(x.dtype), glu.apply(x, *rest))[1]))

    fcfg = load_config("tiny").fusion
    torch.manual_seed(0)
    base = H3FusionForCausalLM(H3FusionConfig(**TINY, num_experts=3, num_experts_per_tok=2))
    losses = {}
    for name in ("fp32", "bf16"):
        model = set_trainable(copy.deepcopy(base), "router+experts", 4, 8, 0.0, ["q_proj"]).train()
        engine, task = _engine(model, _cpu(name)), FusionTask(fcfg, None, model.config, [])
        total, terms = task.loss(engine, _batch())
        probs = [r.probs_TE for r in task._last[0].router_outputs]
        logits = [r.logits_TE for r in task._last[0].router_outputs]
        assert {t.dtype for t in (*terms.values(), *probs, *logits)} == {torch.float32}, name
        engine.backward(total)
        assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[name] = {k: v.item() for k, v in terms.items()}
        assert expert_inputs == {torch.float32 if name == "fp32" else torch.bfloat16}, name
        expert_inputs.clear()
    for key, value in losses["fp32"].items():
        assert abs(losses["bf16"][key] - value) < 0.03 * abs(value) + 1e-3, key


@pytest.mark.parametrize("accelerator, precision, ds_bf16", [
    ("cpu", "auto", False), ("cpu", "fp32", False), ("cpu", "bf16", False),
    ("cuda", "auto", True), ("cuda", "bf16", True), ("cuda", "fp32", False)])
def test_deepspeed_bf16_mode_follows_the_precision(accelerator, precision, ds_bf16):
    raw = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": False},
           "zero_optimization": {"stage": 3}}
    settings = DsTrainSettings(1, 1, 1.0, 1e-3, 0.0, 1, precision)
    ds = resolve_ds_config(raw, settings, accelerator=accelerator)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (ds_bf16, False)


def test_a_ds_json_forcing_bf16_disagrees_with_fp32():
    raw = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "_source": "x.json"}
    with pytest.raises(ValueError, match=r"x.json: bf16.enabled=True.*precision 'fp32'"):
        resolve_ds_config(raw, DsTrainSettings(1, 1, 1.0, 1e-3, 0.0, 1, "fp32"), "cuda")
    assert BF16.mode.startswith("DeepSpeed bf16") and BF16.autocast is None


def _loop_with_saved(now: dict) -> TrainLoop:
    engine = SimpleNamespace(device=torch.device("cpu"))
    ckpts = SimpleNamespace(dir=Path("/ckpts/expert"))
    return TrainLoop(engine, None, LoopSettings(1, 1, config_key="expert_config", config=now),
                     ckpts)


def test_resume_in_another_precision_is_refused_naming_the_key():
    section = {"method": "ffn", "train": {"lr": 1e-3, "precision": "auto", "log_every": 1}}
    fp32 = comparable_config(section, "fp32")
    bf16 = comparable_config({**section, "train": {**section["train"], "precision": "bf16"}},
                             "bf16")
    assert fp32 == comparable_config({**section, "train": {**section["train"],
                                                          "precision": "fp32"}}, "fp32")
    with pytest.raises(ValueError, match=r"expert_config: train.precision: 'fp32' -> 'bf16'\)"):
        _loop_with_saved(bf16)._check_config("step0000002", fp32)
    # checkpoints saved before precisions were resolved ("auto", or no key): what auto did
    _loop_with_saved(fp32)._check_config("step0000002", comparable_config(section))
    legacy = {**section, "train": {"lr": 1e-3, "log_every": 1}}
    _loop_with_saved(fp32)._check_config("step0000002", comparable_config(legacy))
    assert config_differences({"a": 1, "t": {"x": 1}}, {"a": 1, "t": {"x": 2}}) == ["t.x: 1 -> 2"]


@pytest.fixture
def no_cpu_bf16(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_bf16_support", lambda: None)


def test_bf16_on_a_cpu_without_it_is_one_error_before_any_stage_writes(tmp_path, no_cpu_bf16,
                                                                       monkeypatch):
    from pipeline.train.base.stage import run_base_stage
    from pipeline.layout import RunLayout
    from pipeline.train.expert.stage import checked_job
    from pipeline.train.fusion.stage import FusionPaths, train_fusion

    monkeypatch.setenv("H3F_DEVICE", "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")   # accelerator_kind() sets it: restored after
    cfg = load_config("tiny", ["base.train.precision=bf16", "expert.train.precision=bf16",
                               "fusion.train.precision=bf16"])
    message = r"{}: bf16 was asked for, but this CPU has no bf16 instructions"
    with pytest.raises(ValueError, match=message.format(r"base\.train\.precision")):
        run_base_stage(cfg.base, tmp_path)
    layout = RunLayout.at(tmp_path)
    outputs = (tmp_path / "out", tmp_path / "ds", tmp_path / "tb")
    for key, extra in (("expert", {}), ("fusion", {"precision_key": "fusion.train.precision"})):
        with pytest.raises(ValueError, match=message.format(key + r"\.train\.precision")):
            checked_job(cfg, layout, "helpful", outputs, lambda: 100, False, False, **extra)
    with pytest.raises(ValueError, match=message.format(r"fusion\.train\.precision")):
        train_fusion(cfg, FusionPaths.for_run(layout))
    assert sorted(p.name for p in tmp_path.iterdir()) == []

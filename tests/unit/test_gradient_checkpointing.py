"""`train.gradient_checkpointing`: the same loss and gradients (fp32, <= 1e-6) with and without it,
for the dense Llama of stage 1 (FFN trainable; LoRA with dropout) and the H3Fusion MoE of stage 2 (router only,
router + experts; the gating loss reads the routing outputs of the checkpointed layers), the
switch really recomputes (each layer's forward starts twice per step), and each stage's model builder
reads its own key."""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.train.fusion import losses
from pipeline.config import load_config
from pipeline.model import H3FusionConfig, H3FusionForCausalLM, set_trainable
from pipeline.train.expert.stage import mark_ffn_trainable
from pipeline.train.grad_checkpointing import checkpointed_layers, prepare_for_training

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY["vocab_size"], (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                       # one padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100                  # prompt tokens
    task = torch.eye(3)[torch.tensor([0, 1, 2])]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_label": task}


def _dense():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()   # eval, as from_pretrained returns it
    mark_ffn_trainable(model)
    return model


def _dense_lora(checkpointing: bool):
    """Stage 1's LoRA method (with dropout): checkpointing is enabled before PEFT wraps."""
    from peft import LoraConfig, get_peft_model

    model = prepare_for_training(_dense(), checkpointing)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                             target_modules=["gate_proj", "up_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:   # B starts at 0, which would leave lora_A without a gradient
            torch.nn.init.normal_(param)
    return model


def _moe(trainable: str):
    torch.manual_seed(0)
    model = H3FusionForCausalLM(H3FusionConfig(**TINY, num_experts=3, num_experts_per_tok=2)).eval()
    return set_trainable(model, trainable)


def _step(model, batch: dict, moe: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss (CE, + the gating loss for the MoE), the trainable gradients, and how often layer 0
    started its forward (its first module, inside the checkpointed region) in forward + backward."""
    calls = []
    layer0 = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    hook = layer0.input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)   # LoRA dropout: the same draws in both runs (the recompute replays them)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    loss = out.loss
    if moe:
        gate_mask = losses.gate_token_mask(batch["attention_mask"], batch["labels"], "all")
        loss = loss + losses.gating_loss([r.probs_TE for r in out.router_outputs], gate_mask,
                                         batch["task_label"])
    loss.backward()
    hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("build,moe", [
    (_dense, False),
    (lambda: _moe("router"), True),
    (lambda: _moe("router+experts"), True),
    (None, False),
], ids=["dense-ffn", "moe-router", "moe-router+experts", "dense-lora"])
def test_checkpointing_keeps_loss_and_gradients_and_recomputes(build, moe):
    batch = _batch()
    if build is None:
        plain, ckpt = _dense_lora(False), _dense_lora(True)
    else:
        plain = prepare_for_training(build(), gradient_checkpointing=False)
        ckpt = prepare_for_training(copy.deepcopy(plain), gradient_checkpointing=True)
    assert checkpointed_layers(plain) == 0 and checkpointed_layers(ckpt) == TINY["num_hidden_layers"]
    loss_a, grads_a, calls_a = _step(plain, batch, moe)
    loss_b, grads_b, calls_b = _step(ckpt, batch, moe)
    assert (calls_a, calls_b) == (1, 2)   # the checkpointed layer runs again in the backward pass
    assert torch.isfinite(loss_a) and abs(float(loss_a - loss_b)) <= 1e-6
    assert sorted(grads_a) == sorted(grads_b) and grads_a
    for name, grad in grads_a.items():
        assert grad.abs().max() > 0, name     # every trainable tensor gets a gradient
        assert (grad - grads_b[name]).abs().max() <= 1e-6, name


def _tiny_cfg(section: str, on: bool):
    cfg = load_config("tiny", [f"{section}.train.gradient_checkpointing={str(on).lower()}"])
    assert getattr(cfg, section).train.gradient_checkpointing is on
    return cfg


@pytest.mark.parametrize("on", [True, False])
def test_stage1_model_builder_reads_expert_train_key(tmp_path, monkeypatch, on):
    from pipeline.backends import deepspeed_engine
    from pipeline.train.expert.stage import ExpertJob, build_model

    _dense().save_pretrained(tmp_path / "base")
    # no ZeRO-3 partitioning in one process without deepspeed: the builder's own logic only
    monkeypatch.setattr(deepspeed_engine, "zero3_init_context", lambda _: contextlib.nullcontext())
    job = ExpertJob(_tiny_cfg("expert", on), "helpful", tmp_path / "base", tmp_path, tmp_path,
                    tmp_path, tmp_path, {"bf16": {"enabled": False}}, False, 1, 0)
    model = build_model(job)
    assert model.training and checkpointed_layers(model) == (TINY["num_hidden_layers"] if on else 0)


@pytest.mark.parametrize("on", [True, False])
def test_stage2_model_builder_reads_fusion_train_key(monkeypatch, on):
    from pipeline.backends import deepspeed_engine
    from pipeline.train.fusion import loop as fusion_loop

    cfg = _tiny_cfg("fusion", on)
    loop = object.__new__(fusion_loop.FusionLoop)   # the builder alone: no signals, no engine
    loop.cfg, loop.fcfg, loop.ds = cfg, cfg.fusion, {"zero_optimization": {"stage": 2}}
    monkeypatch.setattr(fusion_loop.FusionLoop, "_load_model",
                        lambda self, cls, dse, zero3: _moe("router"))
    monkeypatch.setattr(fusion_loop, "expert_parallel_group", lambda ep: None)  # no process group
    model = loop._build_model(deepspeed_engine)
    assert model.training and checkpointed_layers(model) == (TINY["num_hidden_layers"] if on else 0)


def test_baselines_take_the_key_of_the_train_section_they_run_with():
    """multitask trains with expert.train, extra_steps with fusion.train (docs/baselines.md):
    the stage-1 job they build carries that section's switch."""
    from pipeline.train.baselines.stage import _baseline_config

    cfg = _tiny_cfg("fusion", True)
    assert not _baseline_config(cfg, cfg.expert.train).expert.train.gradient_checkpointing
    assert _baseline_config(cfg, cfg.fusion.train).expert.train.gradient_checkpointing


def test_resume_ignores_the_switch():
    """Checkpointing changes memory and time, not the run: a run may resume with it flipped."""
    from pipeline.train.loop import comparable_config

    cfg = load_config("tiny")
    on = dataclasses.replace(cfg.fusion, train=dataclasses.replace(cfg.fusion.train,
                                                                   gradient_checkpointing=True))
    assert comparable_config(dataclasses.asdict(on)) == comparable_config(dataclasses.asdict(cfg.fusion))

"""The DeepSpeed engine the fusion stage builds (pipeline.backends.deepspeed_engine, ZeRO-2 from
ds_configs/zero2_fusion_ep.json) on the GPU: bf16 switched on by the resolver, parameters in bf16
on cuda, a tiny H3Fusion MoE trains (loss finite and lower after a few steps on one batch).
One rank over NCCL; the 30-step SmolLM2-shaped run is tools/gpu/fusion_smoke.py."""
import math
from pathlib import Path

import pytest
import torch

from gpu_backends import require, world1_nccl_group
from pipeline.model import H3FusionConfig, H3FusionForCausalLM

pytestmark = pytest.mark.gpu
ZERO2 = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2_fusion_ep.json"


def test_zero2_bf16_engine_trains_a_tiny_moe():
    require("deepspeed")
    require("nccl")
    world1_nccl_group()
    from pipeline.backends import deepspeed_engine as dse

    raw = dse.load_ds_config(ZERO2, require_stage=2)
    ds = dse.resolve_ds_config(raw, dse.DsTrainSettings(
        micro_batch_size=4, grad_accum_steps=1, grad_clip=1.0, lr=3e-3, weight_decay=0.0,
        world_size=1))
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    dse.init_distributed()
    torch.manual_seed(0)
    model = H3FusionForCausalLM(H3FusionConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2))
    engine = dse.build_engine(model, ds, model.parameters(), lr=3e-3)
    params = list(engine.module.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and all(p.is_cuda for p in params)
    ids = torch.randint(0, 256, (4, 32), device=engine.device)
    losses = []
    for _ in range(8):
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses
    norm = engine.grad_norm()
    assert norm is not None and math.isfinite(norm)

"""The torch MoE backend on CUDA in bf16, each expert implementation ("loop": per-expert GEMMs,
"grouped_mm": torch._grouped_mm) against the naive per-token reference in fp32: forward and
gradients. Skips without CUDA; FAILS when H3F_REQUIRE_GPU_BACKENDS names the implementation."""
import pytest
import torch

from gpu_backends import (WEIGHTS, assert_grads_close, moe_case, reference_fwd_bwd, rel_err,
                          require)
from pipeline.model.routing import auto_impl, dropless_moe

pytestmark = pytest.mark.gpu

# bf16 activations and weights, fp32 accumulation: a few bf16 roundings (2^-8) per value
OUT_TOL, GRAD_TOL = 2e-2, 3e-2
CASES = [(3, 2), (4, 1), (8, 2)]   # (experts, top_k); (3, 2) is H3Fusion's


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("experts,top_k", CASES)
def test_matches_naive_reference_forward_and_grads(impl, experts, top_k):
    require(impl)
    case = moe_case(tokens=64, hidden=128, ffn=256, experts=experts, top_k=top_k, seed=experts)
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.items()}
    out, routing = dropless_moe(*(leaves[k] for k in WEIGHTS), top_k=top_k, impl=impl)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_grads = reference_fwd_bwd(case, top_k, grad_out)
    assert int(routing.tokens_per_expert_E.sum()) == 64 * top_k
    assert rel_err(out, ref_out) < OUT_TOL
    assert all(leaves[name].grad.dtype == torch.bfloat16 for name in WEIGHTS)
    assert_grads_close({k: leaves[k].grad for k in WEIGHTS}, ref_grads, top_k, GRAD_TOL)


def test_auto_picks_grouped_mm_for_bf16_and_the_loop_for_fp32(monkeypatch):
    require("grouped_mm")
    assert auto_impl("cuda", torch.bfloat16, 256, 128) == "grouped_mm"
    assert auto_impl("cuda", torch.float32, 256, 128) == "loop"
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = moe_case(tokens=32, hidden=128, ffn=256, experts=3, top_k=2, seed=0)
    dropless_moe(*(case[k] for k in WEIGHTS), top_k=2, impl="auto")
    assert len(calls) == 3, "impl='auto' did not take torch._grouped_mm on a bf16 sm90+ GPU"
    calls.clear()
    dropless_moe(*(case[k].float() for k in WEIGHTS), top_k=2, impl="auto")
    assert calls == [], "impl='auto' took torch._grouped_mm for fp32 (it needs bf16)"

"""The MegaBlocks backend (CUDA, bf16) against the naive per-token reference in fp32 and against
the torch backend on the same weights: forward and gradients. Each test skips without MegaBlocks
(or CUDA); it FAILS instead when H3F_REQUIRE_GPU_BACKENDS names "megablocks"."""
import copy

import pytest
import torch

from gpu_backends import assert_grads_close, moe_case, reference_fwd_bwd, rel_err, require
from pipeline.model import H3FusionConfig, H3FusionForCausalLM, H3FusionMoE, set_moe_backend

pytestmark = pytest.mark.gpu

# MegaBlocks' grouped GEMM runs in bf16: relative errors at bf16 precision
REL_TOL, GRAD_TOL = 2e-2, 3e-2


@pytest.fixture(autouse=True)
def _megablocks():
    require("megablocks")


def _config(**kw):
    # ffn a multiple of 128 keeps MegaBlocks happy for every mlp_impl
    return H3FusionConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, **kw)


def _layer_with(case: dict, experts: int, top_k: int) -> H3FusionMoE:
    layer = H3FusionMoE(_config(num_experts=experts, num_experts_per_tok=top_k,
                                moe_backend="megablocks")).cuda().to(torch.bfloat16)
    with torch.no_grad():
        layer.router.weight.copy_(case["router"])
        for name in ("w1", "v1", "w2"):
            getattr(layer.experts, name).copy_(case[name])
    return layer


@pytest.mark.parametrize("experts,top_k", [(3, 2), (4, 1), (8, 2)])
def test_matches_naive_reference_forward_and_grads(experts, top_k):
    case = moe_case(tokens=64, hidden=128, ffn=256, experts=experts, top_k=top_k, seed=experts)
    layer = _layer_with(case, experts, top_k)
    x = case["x"].clone().requires_grad_(True)
    out, _ = layer(x[None])
    grad_out = torch.randn_like(out[0])
    out[0].backward(grad_out)
    ref_out, ref_grads = reference_fwd_bwd(case, top_k, grad_out)
    assert rel_err(out[0], ref_out) < REL_TOL
    got = {"x": x.grad, "router": layer.router.weight.grad,
           **{n: getattr(layer.experts, n).grad for n in ("w1", "v1", "w2")}}
    assert_grads_close(got, ref_grads, top_k, GRAD_TOL)


@pytest.mark.parametrize("num_experts,top_k", [(3, 2), (4, 1), (8, 2)])
def test_moe_layer_forward_and_grads_match_torch_backend(num_experts, top_k):
    torch.manual_seed(num_experts)
    ref = H3FusionMoE(_config(num_experts=num_experts, num_experts_per_tok=top_k))
    ref = ref.cuda().to(torch.bfloat16)
    mb = copy.deepcopy(ref)
    mb.set_backend("megablocks")
    x = torch.randn(4, 33, 128, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    outs, grads = [], []
    for module in (ref, mb):
        xi = x.clone().requires_grad_(True)
        out, routing = module(xi)
        (out * grad_out).sum().backward()
        outs.append((out, routing))
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    (out_ref, r_ref), (out_mb, r_mb) = outs
    assert torch.equal(r_ref.topk_idx_TK, r_mb.topk_idx_TK)
    assert rel_err(out_mb, out_ref) < REL_TOL
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_grads_close(dict(zip(names, grads[1])), dict(zip(names, grads[0])), top_k, REL_TOL)


def test_full_model_logits_match_torch_backend():
    torch.manual_seed(0)
    model = H3FusionForCausalLM(_config(num_experts=3, num_experts_per_tok=2))
    model = model.cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 17), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        set_moe_backend(model, "megablocks")
        mb = model(ids).logits
    assert model.config.moe_backend == "megablocks"
    assert rel_err(mb, ref) < REL_TOL


def test_megablocks_rejects_fp32():
    moe = H3FusionMoE(_config(num_experts=3, num_experts_per_tok=2,
                              moe_backend="megablocks")).cuda()
    with pytest.raises(ValueError, match="bf16"):
        moe(torch.randn(1, 4, 128, device="cuda"))

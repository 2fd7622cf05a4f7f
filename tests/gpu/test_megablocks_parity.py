"""torch backend vs MegaBlocks backend on the same weights: forward and gradients (CUDA, bf16)."""
import copy

import pytest
import torch

from pipeline.backends import megablocks_missing
from pipeline.model import H3FusionConfig, H3FusionForCausalLM, H3FusionMoE, set_moe_backend

pytestmark = pytest.mark.gpu
_MISSING = megablocks_missing()
if _MISSING:
    pytest.skip(f"megablocks backend unavailable: needs {_MISSING}", allow_module_level=True)

# MegaBlocks' grouped GEMM runs in bf16; compare relative errors at bf16 precision
REL_TOL = 2e-2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _config(**kw):
    # ffn a multiple of 128 keeps MegaBlocks happy for every mlp_impl
    return H3FusionConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, **kw)


@pytest.mark.parametrize("num_experts,top_k", [(3, 2), (4, 1), (8, 2)])
def test_moe_layer_forward_and_grads_match(num_experts, top_k):
    torch.manual_seed(int(torch.randint(0, 2**30, ()).item()))
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
    assert _rel_err(out_mb, out_ref) < REL_TOL
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, g_mb, g_ref in zip(names, grads[1], grads[0]):
        assert _rel_err(g_mb, g_ref) < REL_TOL, name


def test_full_model_logits_match_and_checkpoint_is_shared():
    torch.manual_seed(0)
    model = H3FusionForCausalLM(_config(num_experts=3, num_experts_per_tok=2))
    model = model.cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 17), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        set_moe_backend(model, "megablocks")
        mb = model(ids).logits
    assert model.config.moe_backend == "megablocks"
    assert _rel_err(mb, ref) < REL_TOL


def test_megablocks_rejects_fp32():
    moe = H3FusionMoE(_config(num_experts=3, num_experts_per_tok=2,
                              moe_backend="megablocks")).cuda()
    with pytest.raises(ValueError, match="bf16"):
        moe(torch.randn(1, 4, 128, device="cuda"))

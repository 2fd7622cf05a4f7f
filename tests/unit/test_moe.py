"""Dropless MoE primitives and the torch backend vs a naive per-token reference (fp32)."""
import pytest
import torch

from pipeline.model import GLUExperts, H3FusionConfig, H3FusionMoE
from pipeline.model.routing import (
    dropless_moe, expert_glu, naive_moe_reference, naive_per_expert_moe, permute, route, unpermute,
)


def _random_moe(tokens, hidden, ffn, experts, seed=None, requires_grad=True):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    mk = lambda *s: (torch.randn(*s, generator=gen) * 0.3).requires_grad_(requires_grad)  # noqa: E731
    return (mk(tokens, hidden), mk(experts, hidden), mk(experts * ffn, hidden),
            mk(experts * ffn, hidden), mk(experts * ffn, hidden))


@pytest.mark.parametrize("experts,top_k", [(3, 2), (4, 1), (4, 3), (1, 1), (3, 3)])
def test_torch_backend_matches_naive_reference_forward_and_grads(experts, top_k):
    args = _random_moe(tokens=37, hidden=16, ffn=24, experts=experts)
    out, _ = dropless_moe(*args, top_k=top_k)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad_out)
    ref = naive_moe_reference(*args, top_k=top_k)
    ref_grads = torch.autograd.grad(ref, args, grad_out)
    assert (out - ref).abs().max() < 1e-5
    for name, g, r in zip(("x", "router", "w1", "v1", "w2"), grads, ref_grads):
        assert (g - r).abs().max() < 1e-5, name


def test_naive_per_expert_baseline_matches_reference():
    args = _random_moe(tokens=29, hidden=8, ffn=12, experts=3, requires_grad=False)
    out, _ = naive_per_expert_moe(*args, top_k=2)
    assert (out - naive_moe_reference(*args, top_k=2)).abs().max() < 1e-5


def test_route_renormalises_topk_and_counts_tokens():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])
    router = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    r = route(x, router, top_k=2)
    probs = torch.softmax(x @ router.T, dim=-1)
    assert torch.allclose(r.probs_TE, probs)
    assert r.topk_idx_TK.tolist() == [[0, 2], [1, 2], [0, 1]]
    chosen = probs.gather(1, r.topk_idx_TK)
    assert torch.allclose(r.topk_weight_TK, chosen / chosen.sum(1, keepdim=True))
    assert r.tokens_per_expert_E.tolist() == torch.bincount(r.topk_idx_TK.flatten(), minlength=3).tolist()
    assert int(r.tokens_per_expert_E.sum()) == 6


def test_route_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(4, 8), torch.randn(3, 8), top_k=4)


def test_permute_groups_pairs_by_expert_and_unpermute_inverts():
    topk_idx = torch.tensor([[2, 0], [1, 2], [0, 1]])
    x = torch.arange(3.0)[:, None].repeat(1, 2)
    x_P, perm = permute(x, topk_idx)
    assert perm.expert_idx_P.tolist() == [0, 0, 1, 1, 2, 2]
    assert perm.token_idx_P.tolist() == [0, 2, 1, 2, 0, 1]
    assert x_P[:, 0].tolist() == [0, 2, 1, 2, 0, 1]
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    assert torch.allclose(unpermute(x_P, perm, weights, 3), x)   # weights sum to 1 per token


def test_expert_glu_handles_empty_experts_and_checks_counts():
    _, _, w1, v1, w2 = _random_moe(5, 8, 4, 3, requires_grad=False)
    x = torch.randn(5, 8)
    y = expert_glu(x, torch.tensor([0, 5, 0]), w1, v1, w2)
    sl = slice(4, 8)
    ref = (torch.nn.functional.silu(x @ w1[sl].T) * (x @ v1[sl].T)) @ w2[sl]
    assert torch.allclose(y, ref, atol=1e-6)
    with pytest.raises(ValueError, match="sums to 4"):
        expert_glu(x, torch.tensor([1, 1, 2]), w1, v1, w2)


def test_moe_module_uses_contract_parameter_names_and_shapes():
    cfg = H3FusionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=32, num_experts=4,
                         num_experts_per_tok=2)
    moe = H3FusionMoE(cfg)
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    assert shapes == {"router.weight": (4, 16), "experts.w1": (96, 16),
                      "experts.v1": (96, 16), "experts.w2": (96, 16)}
    out, routing = moe(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16) and routing.probs_TE.shape == (10, 4)
    assert routing.topk_idx_TK.shape == (10, 2) and int(routing.tokens_per_expert_E.sum()) == 20


def test_load_dense_mlp_layout_and_shape_errors():
    experts = GLUExperts(num_experts=2, hidden_size=4, ffn_size=3)
    gate, up, down = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 3)
    experts.load_dense_mlp(1, gate, up, down)
    w1, v1, w2 = experts.expert_params(1)
    assert torch.equal(w1, gate) and torch.equal(v1, up) and torch.equal(w2, down.T)
    with pytest.raises(ValueError, match="down_proj"):
        experts.load_dense_mlp(0, gate, up, down.T)


def test_megablocks_backend_without_cuda_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the error path is for machines without it")
    with pytest.raises(RuntimeError, match="CUDA GPU.*megablocks|megablocks.*CUDA"):
        H3FusionMoE(H3FusionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=16, moe_backend="megablocks"))

"""The torch backend's expert-parallel dispatch (all_gather + autograd all_to_all_single) over a
real NCCL process group on the GPU, against the single-process dropless path.

ONE rank only: NCCL refuses two ranks on one GPU, and the GPU check has one GPU. So this runs
every NCCL call of the dispatch (counts all_gather, both all-to-alls, their backward) for real,
but every token stays on its rank: what crosses GPUs on a multi-GPU node (the split sizes
between ranks, uneven expert ranges) is covered on CPU by tests/dist/test_expert_parallel.py
(gloo), not here."""
import pytest
import torch

from gpu_backends import WEIGHTS, moe_case, rel_err, require, world1_nccl_group
from pipeline.model import ExpertParallel
from pipeline.model.routing import dropless_experts, route

pytestmark = pytest.mark.gpu


class _Experts:
    """The GLUExperts attributes the dispatch reads."""

    def __init__(self, case: dict, experts: int):
        self.w1, self.v1, self.w2 = case["w1"], case["v1"], case["w2"]
        self.num_experts, self.ffn_size = experts, case["w1"].shape[0] // experts


@pytest.mark.parametrize("experts,top_k", [(3, 2), (8, 2)])
def test_one_rank_nccl_dispatch_matches_local_experts(experts, top_k):
    require("nccl")
    group = world1_nccl_group()
    case = moe_case(tokens=48, hidden=128, ffn=256, experts=experts, top_k=top_k, seed=experts)
    results = []
    for use_ep in (False, True):
        leaves = {k: v.clone().requires_grad_(True) for k, v in case.items()}
        routing = route(leaves["x"], leaves["router"], top_k)
        mlp = _Experts(leaves, experts)
        if use_ep:
            out = ExpertParallel(group, experts).dispatch(leaves["x"], routing, mlp)
        else:
            out = dropless_experts(leaves["x"], routing, mlp.w1, mlp.v1, mlp.w2)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        results.append((out.detach(), {k: leaves[k].grad for k in WEIGHTS}))
    (ref, ref_grads), (ep, ep_grads) = results
    assert rel_err(ep, ref) < 1e-2
    for name in WEIGHTS:
        assert rel_err(ep_grads[name], ref_grads[name]) < 1e-2, name

"""Expert parallelism over 2 real gloo processes vs one process: outputs and gradients."""
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model import H3FusionConfig, H3FusionForCausalLM, H3FusionMoE, apply_expert_parallel
from pipeline.model.expert_parallel import expert_ranges

pytestmark = pytest.mark.dist
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(num_experts, top_k):
    return H3FusionConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_experts=num_experts,
                          num_experts_per_tok=top_k)


def _layer_case(num_experts, top_k, seed):
    """Same weights on every rank; different tokens per rank (rank r gets inputs[r])."""
    torch.manual_seed(seed)
    moe = H3FusionMoE(_config(num_experts, top_k))
    inputs = [torch.randn(3, 5 + 2 * r, 16) for r in range(WORLD)]
    grads_out = [torch.randn_like(x) for x in inputs]
    return moe, inputs, grads_out


def _summed_grads(module):
    """EP grads are exact per owner and zero elsewhere: the DP all-reduce recovers the total."""
    grads = {}
    for name, p in module.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g
    return grads


def _check_layer(rank, num_experts, top_k, seed):
    moe, inputs, grads_out = _layer_case(num_experts, top_k, seed)
    x = inputs[rank].clone().requires_grad_(True)
    apply_expert_parallel(moe, dist.group.WORLD)
    lo, hi = moe.expert_parallel.local_experts
    out, routing = moe(x)
    (out * grads_out[rank]).sum().backward()
    ep_grads = _summed_grads(moe)
    # a rank's own gradient is zero outside the rows of the experts it owns
    ffn = moe.experts.ffn_size
    own = torch.zeros(num_experts * ffn, dtype=torch.bool)
    own[lo * ffn:hi * ffn] = True
    assert moe.experts.w1.grad[~own].abs().sum() == 0
    # single-process reference on the same inputs (loss = sum over ranks' losses)
    ref, ref_inputs, _ = _layer_case(num_experts, top_k, seed)
    xs = [t.clone().requires_grad_(True) for t in ref_inputs]
    ref_outs = [ref(t)[0] for t in xs]
    sum((o * g).sum() for o, g in zip(ref_outs, grads_out)).backward()
    assert (out - ref_outs[rank]).abs().max() < 1e-5
    assert (x.grad - xs[rank].grad).abs().max() < 1e-5
    for name, p in ref.named_parameters():
        assert (ep_grads[name] - p.grad).abs().max() < 1e-5, name
    assert torch.equal(routing.tokens_per_expert_E, ref(ref_inputs[rank])[1].tokens_per_expert_E)


def _check_model(rank, seed):
    torch.manual_seed(seed)
    model = H3FusionForCausalLM(_config(3, 2)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed + 1 + rank))
    with torch.no_grad():
        ref = model(ids).logits
        apply_expert_parallel(model, dist.group.WORLD)
        ep = model(ids).logits
    assert (ep - ref).abs().max() < 1e-5


def _worker(rank, port, seed, failures):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))   # a failed peer must not hang us
    try:
        torch.set_num_threads(1)
        for num_experts, top_k in ((2, 1), (3, 2), (4, 2)):
            _check_layer(rank, num_experts, top_k, seed)
        _check_model(rank, seed)
    except Exception as exc:  # report to the parent instead of hanging the peer
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def test_expert_parallel_two_processes_match_single_process():
    seed = int(torch.randint(0, 2**30, ()).item())   # fresh inputs each run; printed on failure
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(_free_port(), seed, failures), nprocs=WORLD,
                           start_method="spawn", join=True)
    except mp.ProcessRaisedException:
        pass
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, f"seed={seed}: {errors}"


def test_expert_ranges_are_contiguous_and_balanced():
    assert expert_ranges(3, 2) == [(0, 2), (2, 3)]
    assert expert_ranges(4, 2) == [(0, 2), (2, 4)]
    assert expert_ranges(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError, match="num_experts=3"):
        expert_ranges(3, 4)

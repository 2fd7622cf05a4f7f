"""Expert parallelism over 2 real gloo processes vs one process: outputs and gradients."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model import H3FusionConfig, H3FusionForCausalLM, H3FusionMoE, apply_expert_parallel
from pipeline.env import free_port
from pipeline.model.expert_parallel import expert_ranges

pytestmark = pytest.mark.dist
WORLD = 2



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


def _fusion_loss(model, batch, start, gamma_E):
    """The fusion objective's differentiable terms (CE + gate + drift + load balance), on this
    rank's micro batch: what pipeline.train.fusion.loop.FusionTask.loss adds up."""
    from pipeline.train.fusion import losses
    out = model(input_ids=batch["ids"], attention_mask=batch["mask"], labels=batch["labels"])
    probs = [r.probs_TE for r in out.router_outputs]
    return (out.loss + losses.gating_loss(probs, batch["mask"], batch["task"])
            + losses.drift_penalty(model, start, gamma_E)
            + 0.1 * losses.load_balance_loss(probs, [r.topk_idx_TK for r in out.router_outputs],
                                             batch["mask"]))


def _rank_batches(rank, seed, steps):
    gen = torch.Generator().manual_seed(seed + 100 + rank)   # each rank its own tokens
    batches = []
    for _ in range(steps):
        ids = torch.randint(3, 64, (2, 7), generator=gen)
        labels = ids.clone()
        labels[:, :3] = -100
        task = torch.nn.functional.one_hot(torch.randint(0, 3, (2,), generator=gen), 3).float()
        batches.append({"ids": ids, "mask": torch.ones_like(ids), "labels": labels, "task": task})
    return batches


def _train(rank, seed, ep_group, steps):
    """`steps` optimizer steps of router+experts training with DeepSpeed's reduction (mean of
    the ranks' gradients); returns per step the mean loss and the reduced gradients."""
    from pipeline.train.fusion.losses import snapshot_expert_params
    from pipeline.model import set_trainable
    torch.manual_seed(seed)
    model = set_trainable(H3FusionForCausalLM(_config(3, 2)), "router+experts")
    apply_expert_parallel(model, ep_group)
    start = snapshot_expert_params(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # SGD, not Adam: Adam turns float-noise-sized gradient differences (an entry ~1e-9 in one run,
    # -1e-9 in the other) into full ±lr steps, so final weights would differ by far more than the
    # gradients do; with SGD a weight differs by at most lr x the gradient difference
    opt = torch.optim.SGD([p for _, p in params], lr=0.1)
    record = []
    for batch in _rank_batches(rank, seed, steps):
        opt.zero_grad()
        loss = _fusion_loss(model, batch, start, [0.5, 1.0, 2.0])
        loss.backward()
        local = {n: p.grad.clone() for n, p in params}
        for _, p in params:
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        record.append((float(mean_loss) / WORLD, {n: p.grad.clone() for n, p in params}, local))
        opt.step()
    return record, model


def _check_training_uneven_split(rank, seed, steps=4):
    """E=3, top-2, EP=2 (rank 0 owns experts 0-1, rank 1 owns expert 2) vs EP=1 (plain data
    parallel): same loss and reduced gradients at every step, so the same weights after."""
    ref, ref_model = _train(rank, seed, None, steps)
    ep, ep_model = _train(rank, seed, dist.group.WORLD, steps)
    lo, hi = ep_model.model.layers[0].mlp.expert_parallel.local_experts
    assert (lo, hi) == [(0, 2), (2, 3)][rank]
    ffn = ep_model.model.layers[0].mlp.experts.ffn_size
    for step, ((loss1, g1, _), (loss2, g2, local2)) in enumerate(zip(ref, ep)):
        assert abs(loss1 - loss2) <= 1e-5, (step, loss1, loss2)
        for name in g1:
            assert (g1[name] - g2[name]).abs().max() <= 1e-5, (step, name)
            if name.endswith("experts.w2"):   # every expert and the router learn
                per_expert = g1[name].view(3, ffn, -1).abs().flatten(1).sum(1)
                assert bool((per_expert > 0).all()), (step, name, per_expert)
            if name.endswith("experts.w2") and step == 0:   # drift's gradient is 0 at θ⁰ only
                foreign = torch.ones(3 * ffn, dtype=torch.bool)
                foreign[lo * ffn:hi * ffn] = False
                assert local2[name][foreign].abs().sum() == 0, (step, name)
            if name.endswith("router.weight"):
                assert g1[name].abs().sum() > 0, (step, name)
    for (n1, p1), (n2, p2) in zip(ref_model.named_parameters(), ep_model.named_parameters()):
        assert (p1 - p2).abs().max() <= 1e-5, n1


def _worker(rank, port, seed, failures):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))   # a failed peer must not hang us
    try:
        torch.set_num_threads(1)
        for num_experts, top_k in ((2, 1), (3, 2), (4, 2)):
            _check_layer(rank, num_experts, top_k, seed)
        _check_model(rank, seed)
        _check_training_uneven_split(rank, seed)
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
        mp.start_processes(_worker, args=(free_port(), seed, failures), nprocs=WORLD,
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

"""Fusion training on 2 real gloo processes: every trainable set, gating loss, drift penalty,
EP=2 == EP=1 (E=3, top-2, uneven split), the NaN guard and the collapse warning. All runs share
ONE process group (one DeepSpeed start-up); each run's assertions are below."""
from __future__ import annotations

import json
import math

import pytest
import torch

from test_fuse_support import REPO, build_tiny_fused, load_weights, make_rows, result, run_jobs

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse_train")
    init3 = build_tiny_fused(root / "init3", 3)
    (root / "rows3.json").write_text(json.dumps(make_rows(3)))

    def job(name, overrides, init=init3, rows="rows3.json", hook=None):
        return {"name": name, "overrides": overrides, "init": str(init), "rows": str(root / rows),
                "run": str(root / name), "hook": hook}

    experts = ["fusion.trainable=router+experts", "fusion.train.lr=0.01"]
    # the paper's E=3 with top-2 (the router gets an LM gradient) on 2 ranks: an uneven 2 + 1 split
    ep = experts + ["fusion.top_k=2", "fusion.gamma.helpful=0.5", "fusion.gamma.honest=0.2",
                    "fusion.train.max_steps=6"]
    jobs = [
        job("router", ["fusion.trainable=router", "fusion.train.max_steps=12"]),
        job("lora", ["fusion.trainable=router+lora", "fusion.train.max_steps=4"]),
        job("experts_g0", experts),
        job("experts_g", experts + ["fusion.gamma.helpful=100.0"]),
        job("ep1", ep + ["fusion.ep_degree=1"]),
        job("ep2", ep + ["fusion.ep_degree=2"]),
        job("zero3", ["fusion.trainable=router", "fusion.train.max_steps=3",
                      f"fusion.ds_config={REPO / 'ds_configs' / 'zero3_fusion.json'}"]),
        job("nan", ["fusion.train.lr=1e-12", "fusion.train.save_every=2", "fusion.collapse_threshold=0.5",
                    "fusion.collapse_steps=2"], hook={"kind": "nan", "step": 3}),
    ]
    codes = run_jobs(jobs, root / "results")
    assert codes == [0, 0], f"worker exit codes {codes}"
    return root


def _ok(root, name):
    res = result(root / "results", name)
    assert "error" not in res, res.get("trace")
    return res


def _routing_accuracy(model_dir, rows, num_tasks):
    """Mean over tasks of token-level top-1 routing accuracy of a saved model on `rows`."""
    from pipeline.data.collate import SFTCollator
    from pipeline.model import H3FusionForCausalLM
    from pipeline.train.fusion.metrics import top1_routing_hits

    model = H3FusionForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = SFTCollator(0)(rows)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    correct, total = top1_routing_hits([r.probs_TE for r in out.router_outputs],
                                       batch["attention_mask"], batch["task_label"])
    return float((correct / total).mean())


def _split(weights, is_trainable):
    return {k for k in weights if is_trainable(k)}, {k for k in weights if not is_trainable(k)}


def test_router_only_trains_router_and_gating_raises_routing_accuracy(runs):
    res = _ok(runs, "router")
    before, after = load_weights(runs / "init3"), load_weights(runs / "router" / "fused")
    assert before.keys() == after.keys()
    routers, frozen = _split(before, lambda k: k.endswith("mlp.router.weight"))
    assert len(routers) == 2
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    for k in routers:
        assert not torch.equal(before[k], after[k]), f"router {k} did not train"
    rows = make_rows(3)
    acc0, acc1 = _routing_accuracy(runs / "init3", rows, 3), _routing_accuracy(runs / "router" / "fused", rows, 3)
    assert acc1 > acc0 + 0.2, (acc0, acc1)
    gates = [h["loss/gate"] for h in res["history"]]
    assert gates[-1] < gates[0] and gates[0] == pytest.approx(math.log(3), rel=1e-4)  # uniform start
    # outputs next to the model: resolved config, manifest; TensorBoard scalars per term
    assert (runs / "router" / "fused" / "resolved_config.yaml").is_file()
    from pipeline.model import H3FusionForCausalLM
    assert H3FusionForCausalLM.from_pretrained(str(runs / "router" / "fused")).config.num_experts == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(runs / "router" / "tensorboard" / "fusion")).Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("loss/ce", "loss/gate", "loss/total", "router/entropy", "speed/tokens_per_s",
                "load/layer0/helpful", "load/layer1/honest", "routing_acc/harmless"):
        assert tag in tags, sorted(tags)
    assert len(ea.Scalars("loss/ce")) == 12


def test_router_plus_lora_changes_only_router_and_attention(runs):
    _ok(runs, "lora")
    before, after = load_weights(runs / "init3"), load_weights(runs / "lora" / "fused")
    assert before.keys() == after.keys()   # LoRA merged back into a plain H3Fusion checkpoint
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    trained, frozen = _split(before, lambda k: k.endswith("router.weight") or any(a in k for a in attn))
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in trained if "router" in k)
    assert any(not torch.equal(before[k], after[k]) for k in trained if "proj" in k)


def _drift(model_dir, init_dir, num_experts):
    from pipeline.model import H3FusionForCausalLM
    from pipeline.train.fusion.losses import expert_drift, snapshot_expert_params

    start = snapshot_expert_params(H3FusionForCausalLM.from_pretrained(str(init_dir)))
    return expert_drift(H3FusionForCausalLM.from_pretrained(str(model_dir)), start, num_experts).detach()


def test_router_plus_experts_and_drift_penalty(runs):
    _ok(runs, "experts_g0"), _ok(runs, "experts_g")
    before, after = load_weights(runs / "init3"), load_weights(runs / "experts_g0" / "fused")
    trained, frozen = _split(before, lambda k: "mlp.router" in k or "mlp.experts" in k)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    for k in trained:
        assert not torch.equal(before[k], after[k]), f"{k} did not train"
    w1 = after["model.layers.0.mlp.experts.w1"].view(3, -1)   # experts stay distinct
    assert min(float((w1[i] - w1[j]).norm()) for i in range(3) for j in range(i + 1, 3)) > 0.1
    free = _drift(runs / "experts_g0" / "fused", runs / "init3", 3)
    held = _drift(runs / "experts_g" / "fused", runs / "init3", 3)
    assert float(free[0]) > 0
    assert float(held[0]) < 0.5 * float(free[0]), (held.tolist(), free.tolist())


def test_expert_parallel_matches_data_parallel(runs):
    ep1, ep2 = _ok(runs, "ep1"), _ok(runs, "ep2")
    curve1 = [h["loss/total"] for h in ep1["history"]]
    curve2 = [h["loss/total"] for h in ep2["history"]]
    assert len(curve1) == len(curve2) == 6
    assert curve1 == pytest.approx(curve2, abs=1e-5, rel=0)
    assert curve1[-1] != curve1[0]   # it trained
    # the global gradient norm after DeepSpeed's reduction, step by step
    assert ep1["grad_norms"] == pytest.approx(ep2["grad_norms"], abs=1e-5, rel=0)
    assert len(ep2["grad_norms"]) == 6 and all(g > 0 for g in ep2["grad_norms"])
    w1, w2 = load_weights(runs / "ep1" / "fused"), load_weights(runs / "ep2" / "fused")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0)
    init = load_weights(runs / "init3")
    for layer in (0, 1):   # the 2-expert rank's and the 1-expert rank's experts and the routers train
        key = f"model.layers.{layer}.mlp.experts.w2"
        moved = (w2[key] - init[key]).view(3, -1).abs().sum(1)
        assert bool((moved > 0).all()), (key, moved)
        router = f"model.layers.{layer}.mlp.router.weight"
        assert not torch.equal(init[router], w2[router])


def test_nan_loss_stops_with_step_and_checkpoint_and_collapse_is_warned(runs):
    res = result(runs / "results", "nan")
    assert "NonFiniteLossError" in res.get("error", ""), res
    assert "at step 4" in res["error"] and "step0000002" in res["error"], res["error"]
    assert not (runs / "nan" / "fused").exists()
    assert any("router collapse" in w for w in res["warnings"]), res["warnings"]


def test_zero3_with_moe_leaf_modules_trains_the_router(runs):
    res = _ok(runs, "zero3")
    assert [h["step"] for h in res["history"]] == [1, 2, 3]
    before, after = load_weights(runs / "init3"), load_weights(runs / "zero3" / "fused")
    routers, frozen = _split(before, lambda k: k.endswith("mlp.router.weight"))
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    assert all(not torch.equal(before[k], after[k]) for k in routers)
    manifest = json.loads((runs / "zero3" / "fused" / "fusion_train_manifest.json").read_text())
    assert manifest["zero_stage"] == 3

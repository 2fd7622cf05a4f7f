"""H3FusionForCausalLM: HF integration, dense equivalence, router outputs, trainable modes."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.train.fusion.losses import gating_loss
from pipeline.model import H3FusionConfig, H3FusionForCausalLM, moe_layers, set_trainable
from pipeline.model.trainable import trainable_parameter_names

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_moe(num_experts=3, top_k=2, **kw):
    return H3FusionForCausalLM(H3FusionConfig(**TINY, num_experts=num_experts,
                                              num_experts_per_tok=top_k, **kw)).eval()


def fuse_dense(dense_models, top_k):
    """Minimal surgery for tests: shared parts from the first model, MLP i -> expert i."""
    cfg = H3FusionConfig(**{**dense_models[0].config.to_dict(), "model_type": "h3fusion"},
                         num_experts=len(dense_models), num_experts_per_tok=top_k)
    moe = H3FusionForCausalLM(cfg).eval()
    missing, _ = moe.load_state_dict(dense_models[0].state_dict(), strict=False)
    assert all(".mlp." in k for k in missing), missing
    for layer_idx, layer in enumerate(moe.model.layers):
        for e, dense in enumerate(dense_models):
            mlp = dense.model.layers[layer_idx].mlp
            layer.mlp.experts.load_dense_mlp(e, mlp.gate_proj.weight, mlp.up_proj.weight,
                                             mlp.down_proj.weight)
    return moe


def dense_llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def test_auto_classes_and_save_load_roundtrip(tmp_path):
    model = tiny_moe(num_experts=4, top_k=3, expert_names=["a", "b", "c", "d"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, H3FusionConfig) and cfg.num_experts == 4 and cfg.num_experts_per_tok == 3
    assert cfg.expert_names == ["a", "b", "c", "d"] and cfg.moe_backend == "torch"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, H3FusionForCausalLM)
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_depth_width_and_expert_count_come_from_config():
    model = H3FusionForCausalLM(H3FusionConfig(**{**TINY, "num_hidden_layers": 3}, num_experts=5,
                                               num_experts_per_tok=1))
    assert len(moe_layers(model)) == 3
    w1 = model.state_dict()["model.layers.2.mlp.experts.w1"]
    assert tuple(w1.shape) == (5 * TINY["intermediate_size"], TINY["hidden_size"])
    out = model(torch.randint(0, 96, (1, 4)))
    assert len(out.router_outputs) == 3 and out.router_outputs[0].probs_TE.shape == (4, 5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="expert_names"):
        H3FusionConfig(**TINY, num_experts=2, expert_names=["x"])
    with pytest.raises(ValueError, match="moe_backend"):
        H3FusionConfig(**TINY, moe_backend="tutel")


def test_single_expert_moe_equals_dense_llama():
    dense = dense_llama(seed=1)
    moe = fuse_dense([dense], top_k=1)
    ids = torch.randint(0, TINY["vocab_size"], (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0   # left padding exercises the attention mask path too
    with torch.no_grad():
        diff = (moe(ids, attention_mask=mask).logits - dense(ids, attention_mask=mask).logits)
    assert diff.abs().max() < 1e-5


def test_identical_experts_top2_equal_dense():
    dense = dense_llama(seed=2)
    moe = fuse_dense([dense, dense, dense], top_k=2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() < 1e-5


def test_experts_from_different_models_stay_distinct():
    dense = [dense_llama(seed=s) for s in (3, 4, 5)]
    moe = fuse_dense(dense, top_k=2)
    experts = moe.model.layers[0].mlp.experts
    for e, src in enumerate(dense):
        w1, v1, w2 = experts.expert_params(e)
        mlp = src.model.layers[0].mlp
        assert torch.equal(w1, mlp.gate_proj.weight) and torch.equal(w2, mlp.down_proj.weight.T)
    assert not torch.equal(experts.expert_params(0)[0], experts.expert_params(1)[0])
    # an update to one expert's rows leaves the others (and the source models) untouched
    before = [t.clone() for t in experts.expert_params(2)]
    with torch.no_grad():
        experts.w1[experts.expert_rows(0)] += 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, experts.expert_params(2)))
    assert not torch.equal(experts.expert_params(0)[0], dense[0].model.layers[0].mlp.gate_proj.weight)
    ptrs = {p.data_ptr() for layer in moe_layers(moe) for p in layer.experts.parameters()}
    assert len(ptrs) == 3 * len(moe_layers(moe))


def test_router_outputs_shapes_and_token_order():
    model = tiny_moe()
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    out = model(ids)
    assert len(out.router_outputs) == TINY["num_hidden_layers"]
    r = out.router_outputs[0]
    assert r.logits_TE.shape == (10, 3) and r.topk_weight_TK.shape == (10, 2)
    assert torch.allclose(r.probs_TE.sum(-1), torch.ones(10))
    # T is row-major over [B, S]: running sample 1 alone reproduces rows 5..9
    alone = model(ids[1:]).router_outputs[0]
    assert torch.allclose(alone.probs_TE, r.probs_TE[5:], atol=1e-6)


def _gating_grads(model, ids, labels):
    model.zero_grad()
    out = model(ids, attention_mask=torch.ones_like(ids), labels=ids)
    loss = out.loss + gating_loss([r.probs_TE for r in out.router_outputs],
                                  torch.ones_like(ids), labels)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_router_outputs_carry_grads_under_activation_checkpointing(reentrant):
    model = tiny_moe().train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    labels = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]])
    plain = _gating_grads(model, ids, labels)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    calls = []
    inner = model.model.layers[0]._gradient_checkpointing_func
    model.model.layers[0]._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    ckpt = _gating_grads(model, ids, labels)
    assert calls, "layer 0 was not checkpointed"
    assert plain.keys() == ckpt.keys() and "model.layers.0.mlp.router.weight" in ckpt
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


def test_two_models_in_one_process_do_not_share_routing_state():
    a, b = tiny_moe(), tiny_moe()
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    ra = a(ids).router_outputs
    b(ids)
    ra2 = a(ids).router_outputs
    assert all(torch.equal(x.probs_TE, y.probs_TE) for x, y in zip(ra, ra2))
    assert not torch.equal(ra[0].probs_TE, b(ids).router_outputs[0].probs_TE)


def test_generate_greedy_runs_and_ignores_moe_top_k():
    model = tiny_moe(top_k=2)
    assert model.generation_config.top_k is None   # MoE top_k is not a sampling setting
    ids = torch.randint(3, TINY["vocab_size"], (2, 4))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids)
    with torch.no_grad():   # greedy decode with the cache == argmax of a full forward
        assert torch.equal(model(out[:, :-1]).logits[:, -1].argmax(-1), out[:, -1])


@pytest.mark.parametrize("mode,expect", [
    ("router", {"router"}),
    ("router+experts", {"router", "experts"}),
    ("router+lora", {"router", "lora"}),
])
def test_set_trainable_modes_route_gradients(mode, expect):
    model = set_trainable(tiny_moe().train(), mode)
    names = trainable_parameter_names(model)
    kinds = {("router" if ".mlp.router." in n else "experts" if ".mlp.experts." in n
              else "lora" if "lora_" in n else n) for n in names}
    assert kinds == expect
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if "lora_A" in name:      # LoRA B starts at zero, so A's first gradient is zero
            continue
        assert has_grad == p.requires_grad, name
    with pytest.raises(ValueError, match="trainable mode"):
        set_trainable(tiny_moe(), "everything")


def test_trainable_param_groups_give_routers_their_own_lr():
    from pipeline.model.trainable import trainable_param_groups
    model = set_trainable(tiny_moe(), "router+experts")
    routers = {id(layer.router.weight) for layer in moe_layers(model)}
    groups = trainable_param_groups(model, router_lr=0.05)
    assert len(groups) == 2 and groups[0]["lr"] == 0.05 and "lr" not in groups[1]
    assert {id(p) for p in groups[0]["params"]} == routers
    assert not routers & {id(p) for p in groups[1]["params"]}
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    # router-only training: one group; no router_lr: no per-group lr
    only = trainable_param_groups(set_trainable(tiny_moe(), "router"))
    assert len(only) == 1 and "lr" not in only[0]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]

"""Pure surgery planning: NAME=DIR parsing, architecture checks, key/shape checks."""
from pathlib import Path

import pytest

from pipeline.surgery import plan

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128, "hidden_act": "silu", "tie_word_embeddings": False}
SPEC = plan.ModelSpec.from_config(LLAMA, "base")


def dense_shapes(spec=SPEC):
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for layer in range(spec.num_hidden_layers):
        for proj, shape in plan.dense_mlp_shapes(spec).items():
            shapes[plan.dense_mlp_key(layer, proj)] = shape
    return shapes


def test_parse_named_dirs_keeps_order_and_rejects_duplicates():
    named = plan.parse_named_dirs(["harmless=/a", "helpful=/b", "honest=/c"])
    assert list(named) == ["harmless", "helpful", "honest"] and named["helpful"] == Path("/b")
    with pytest.raises(ValueError, match="duplicate expert name 'helpful'"):
        plan.parse_named_dirs(["helpful=/a", "helpful=/b"])
    with pytest.raises(ValueError, match="NAME=DIR"):
        plan.parse_named_dirs(["helpful"])
    with pytest.raises(ValueError, match="at least one"):
        plan.parse_named_dirs([])


@pytest.mark.parametrize("key,value", [("hidden_size", 64), ("num_hidden_layers", 3),
                                       ("vocab_size", 256), ("intermediate_size", 40)])
def test_architecture_mismatch_names_the_field(key, value):
    with pytest.raises(ValueError, match=f"{key}={value}.*differs"):
        plan.check_same_architecture(LLAMA, {"expert 'x'": {**LLAMA, key: value}}, "base")


def test_non_llama_is_refused():
    with pytest.raises(ValueError, match="model_type must be 'llama'"):
        plan.check_same_architecture({**LLAMA, "model_type": "mistral"}, {}, "base")


def test_dense_mlp_key_checks():
    plan.check_dense_mlp_keys(dense_shapes(), SPEC, "m")
    shapes = dense_shapes()
    del shapes[plan.dense_mlp_key(1, "up_proj")]
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        plan.check_dense_mlp_keys(shapes, SPEC, "m")
    shapes = dense_shapes()
    shapes[plan.dense_mlp_key(0, "down_proj")] = (48, 32)
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \[48, 32\], expected \[32, 48\]"):
        plan.check_dense_mlp_keys(shapes, SPEC, "m")


def test_moe_shapes_follow_the_contract():
    assert plan.moe_shapes(SPEC, 3) == {"router": (3, 32), "w1": (144, 32), "v1": (144, 32),
                                        "w2": (144, 32)}
    shapes = {plan.router_key(l): (3, 32) for l in range(2)}
    shapes.update({plan.moe_expert_key(l, p): (144, 32) for l in range(2) for p in plan.MOE_PARAMS})
    plan.check_moe_keys(shapes, SPEC, 3, "moe")
    with pytest.raises(ValueError, match="unexpected MoE tensors.*experts.lora_A"):
        plan.check_moe_keys({**shapes, "model.layers.0.mlp.experts.lora_A": (8, 32)}, SPEC, 3, "m")
    with pytest.raises(ValueError, match=r"router.weight has shape \[3, 32\], expected \[2, 32\]"):
        plan.check_moe_keys(shapes, SPEC, 2, "moe")


def test_same_keys_reports_missing_and_shape():
    ref = dense_shapes()
    other = dict(ref)
    other.pop("model.embed_tokens.weight")
    with pytest.raises(ValueError, match="missing \\['model.embed_tokens.weight'\\]"):
        plan.check_same_keys(ref, other, "a", "b")


def test_key_classification_and_dense_config():
    assert plan.layer_of("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj.weight")
    assert plan.is_dense_mlp_key("model.layers.0.mlp.down_proj.weight")
    assert not plan.is_dense_mlp_key("model.layers.0.self_attn.q_proj.weight")
    assert plan.is_moe_key("model.layers.1.mlp.experts.w2")
    assert not plan.is_moe_key("lm_head.weight")
    moe_cfg = {**LLAMA, "model_type": "h3fusion", "num_experts": 3, "num_experts_per_tok": 2,
               "expert_names": ["a", "b", "c"], "moe_backend": "torch"}
    dense = plan.dense_config_from_moe(moe_cfg)
    assert dense["model_type"] == "llama" and "num_experts" not in dense
    assert "num_experts_per_tok" not in dense
    legacy = {**moe_cfg, "top_k": moe_cfg.pop("num_experts_per_tok")}   # pre-rename config.json
    assert "top_k" not in plan.dense_config_from_moe(legacy)
    assert plan.experts_per_token(moe_cfg | {"num_experts_per_tok": 1}, "new") == 1
    assert plan.experts_per_token(legacy, "old") == 2
    with pytest.raises(ValueError, match="no num_experts_per_tok"):
        plan.experts_per_token({"num_experts": 3}, "bare")
    with pytest.raises(ValueError, match="no expert named 'd'"):
        plan.expert_index(["a", "b", "c"], "d", "moe")


def test_shared_keys_outside_llama_are_refused():
    plan.check_shared_keys(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                            "model.layers.3.self_attn.k_proj.weight",
                            "model.layers.0.post_attention_layernorm.weight",
                            "model.layers.1.mlp.experts.w1"], "moe")
    with pytest.raises(ValueError, match="q_proj.lora_A.weight.*fold them in first"):
        plan.check_shared_keys(["model.layers.0.self_attn.q_proj.lora_A.weight"], "moe")

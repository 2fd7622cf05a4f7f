"""export_mixtral: the export loads in transformers' MixtralForCausalLM with the same logits."""
import json
import shutil

import pytest
import torch

from pipeline.surgery.build_moe import build_moe
from pipeline.surgery.export_mixtral import export_mixtral
from surgery_fixtures import TASK_NAMES, dense_state, make_family

IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"))


def _mixtral(path):
    from transformers import MixtralForCausalLM
    model, info = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_logits_match_h3fusion(family, tmp_path, top_k):
    from pipeline.model import H3FusionForCausalLM
    base, experts = family
    moe = build_moe(base, experts, tmp_path / "moe", top_k=top_k, router_init="normal", seed=top_k)
    sd = dense_state(moe)
    out = export_mixtral(moe, tmp_path / "mixtral")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 3
    assert cfg["num_experts_per_tok"] == top_k
    ours = H3FusionForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    mixtral = _mixtral(out)
    with torch.no_grad():
        want, got = ours(IDS).logits, mixtral(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (out / "tokenizer.json").is_file()
    assert sd["model.layers.0.mlp.router.weight"].abs().sum() > 0   # a non-trivial router


def test_scaled_router_changes_routing_and_still_matches(family, tmp_path):
    """Large router weights make top-2 choices differ per token; parity must still hold."""
    from pipeline.model import H3FusionForCausalLM
    base, experts = family
    moe = build_moe(base, experts, tmp_path / "moe", router_init="normal", seed=9)
    ours = H3FusionForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.mlp.router.weight.mul_(200.0)
    ours.save_pretrained(tmp_path / "scaled")
    shutil.copy(moe / "tokenizer.json", tmp_path / "scaled")
    shutil.copy(moe / "tokenizer_config.json", tmp_path / "scaled")
    out = export_mixtral(tmp_path / "scaled", tmp_path / "mixtral")
    with torch.no_grad():
        result = ours(IDS)
        got = _mixtral(out)(IDS).logits
    chosen = {tuple(sorted(r.tolist())) for r in result.router_outputs[0].topk_idx_TK}
    assert len(chosen) > 1
    torch.testing.assert_close(got, result.logits, rtol=0, atol=1e-5)


def test_single_expert_export_equals_the_dense_expert(family, tmp_path):
    from transformers import LlamaForCausalLM
    base, experts = family
    moe = build_moe(base, {"honest": experts["honest"]}, tmp_path / "moe", top_k=1)
    mixtral = _mixtral(export_mixtral(moe, tmp_path / "mixtral"))
    dense = LlamaForCausalLM.from_pretrained(experts["honest"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(mixtral(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-5)


def _tampered(src, dst, **fields):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refuses_what_mixtral_cannot_express(family, tmp_path):
    base, experts = family
    moe = build_moe(base, experts, tmp_path / "moe")
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be <= the number of experts, 3 \(Mixtral"):
        export_mixtral(_tampered(moe, tmp_path / "k4", num_experts_per_tok=4), tmp_path / "o")
    with pytest.raises(ValueError, match="attention_bias=true cannot be expressed"):
        export_mixtral(_tampered(moe, tmp_path / "bias", attention_bias=True), tmp_path / "o")
    with pytest.raises(ValueError, match="model_type must be 'h3fusion'"):
        export_mixtral(experts["helpful"], tmp_path / "o")
    with pytest.raises(FileExistsError):
        export_mixtral(moe, moe)
    assert not (tmp_path / "o").exists()
    assert json.loads((moe / "config.json").read_text())["expert_names"] == list(TASK_NAMES)


def test_tied_embeddings_export_matches(tmp_path):
    from pipeline.model import H3FusionForCausalLM
    from surgery_fixtures import make_expert, save_tiny_llama, tiny_llama_config
    base = tmp_path / "base"
    save_tiny_llama(base, seed=2, config=tiny_llama_config(tie_word_embeddings=True))
    experts = {n: tmp_path / n for n in ("a", "b")}
    for i, path in enumerate(experts.values()):
        make_expert(base, path, seed=10 + i)
    moe = build_moe(base, experts, tmp_path / "moe", top_k=1, router_init="normal")
    mixtral = _mixtral(export_mixtral(moe, tmp_path / "mixtral"))
    assert mixtral.config.tie_word_embeddings
    ours = H3FusionForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(mixtral(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-5)

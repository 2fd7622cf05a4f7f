"""The routing top-k is saved as `num_experts_per_tok`, never as `top_k` (which transformers reads
as top-k sampling); checkpoints written with `top_k` still load; `import pipeline` registers the
model with the Auto classes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from pipeline.model import H3FusionConfig, H3FusionForCausalLM
from pipeline.surgery.build_moe import build_moe
from surgery_fixtures import make_family

REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_experts=3)


def _save(tmp_path: Path, k: int) -> tuple[H3FusionForCausalLM, Path]:
    torch.manual_seed(0)
    model = H3FusionForCausalLM(H3FusionConfig(**TINY, num_experts_per_tok=k)).eval()
    model.save_pretrained(tmp_path / "fused")
    return model, tmp_path / "fused"


def _no_sampling_top_k(model_dir: Path) -> None:
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        assert "top_k" not in json.loads(gen_file.read_text())


def test_saved_config_names_the_routing_top_k_like_mixtral(tmp_path):
    model, out = _save(tmp_path, k=1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == 1 and "top_k" not in cfg
    _no_sampling_top_k(out)
    assert GenerationConfig.from_model_config(model.config).top_k is None
    assert GenerationConfig.from_model_config(cfg).top_k is None
    assert model.model.layers[0].mlp.top_k == 1


def test_load_time_override_reaches_the_layers_not_the_generation_config(tmp_path):
    # the fusion loop's load: from_pretrained(init, num_experts_per_tok=fusion.top_k)
    _, out = _save(tmp_path, k=2)
    model = AutoModelForCausalLM.from_pretrained(out, num_experts_per_tok=3)
    assert model.config.num_experts_per_tok == 3 and model.model.layers[1].mlp.top_k == 3
    assert model.generation_config.top_k is None
    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved/config.json").read_text())["num_experts_per_tok"] == 3
    _no_sampling_top_k(tmp_path / "resaved")


def test_old_checkpoint_with_top_k_loads(tmp_path):
    model, out = _save(tmp_path, k=1)
    cfg = json.loads((out / "config.json").read_text())
    cfg["top_k"] = cfg.pop("num_experts_per_tok")          # as written before the rename
    (out / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen.get("_from_model_config")                   # ...and its derived generation config
    (out / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1}))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_experts_per_tok == 1 and loaded.model.layers[0].mlp.top_k == 1
    assert not hasattr(loaded.config, "top_k") and loaded.generation_config.top_k is None
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded.save_pretrained(tmp_path / "resaved")
    assert "top_k" not in json.loads((tmp_path / "resaved/config.json").read_text())
    _no_sampling_top_k(tmp_path / "resaved")


def test_legacy_and_new_name_must_agree():
    assert H3FusionConfig(**TINY, top_k=1).num_experts_per_tok == 1
    assert H3FusionConfig(**TINY, top_k=3, num_experts_per_tok=3).num_experts_per_tok == 3
    with pytest.raises(ValueError, match="legacy top_k=2 contradicts num_experts_per_tok=1"):
        H3FusionConfig(**TINY, top_k=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="num_experts_per_tok must be <= the number of experts, 3, got 4"):
        H3FusionConfig(**TINY, num_experts_per_tok=4)


def test_build_moe_ignores_a_sampling_top_k_in_the_base_config(tmp_path):
    base, experts = make_family(tmp_path / "family")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "top_k": 50}))   # older transformers
    out = build_moe(base, experts, tmp_path / "moe", top_k=1)
    fused = json.loads((out / "config.json").read_text())
    assert fused["num_experts_per_tok"] == 1 and "top_k" not in fused


def test_import_pipeline_registers_the_auto_classes(tmp_path):
    _, out = _save(tmp_path, k=2)
    code = ("import sys, pipeline\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"c = AutoConfig.from_pretrained({str(out)!r})\n"
            "print(type(m).__name__, type(c).__name__, m.config.num_experts_per_tok)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["H3FusionForCausalLM", "H3FusionConfig", "2"]

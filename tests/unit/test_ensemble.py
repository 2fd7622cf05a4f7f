"""LLM-ensemble baselines (pipeline.ensemble): exact averaging, loading through the evaluation's
loader, generation, prompt-only routing, the classifier, and the `ensemble` stage."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pipeline.ensemble  # noqa: F401  (registers the model type)
from pipeline.ensemble.classifier import (PROMPT_WINDOW, PromptClassifier, prompt_end,
                                          prompt_tokens, response_marker_ids, train_classifier)
from pipeline.ensemble.modeling import EnsembleConfig
from pipeline.ensemble.router import CLASSIFIER_FILE
from pipeline.ensemble.stage import MANIFEST, build_run_ensembles
from pipeline.data.template import encode_prompt_response, format_prompt
from pipeline.eval.models import load_causal_lm
from pipeline.eval.generation import GenerationConfig, generate_token_ids
from pipeline.eval.scoring import (packed_unsupported_reason, score_continuations,
                                   score_continuations_packed, score_encoded)
from pipeline.layout import RunLayout
from test_eval_fixtures import VOCAB, build_data_dir, char_tokenizer, save_tiny_llama

DIMS = ("helpful", "harmless", "honest")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("members")
    return {d: save_tiny_llama(root / d, seed=10 + i) for i, d in enumerate(DIMS)}


def write_ensemble(out: Path, members: dict[str, Path], method: str,
                   classifier: PromptClassifier | None = None) -> Path:
    tok = char_tokenizer()
    marker = response_marker_ids(tok) if method in ("router", "oracle") else None
    out.mkdir(parents=True)
    EnsembleConfig(method=method, members=[str(p) for p in members.values()],
                   member_names=list(members), response_marker_ids=marker,
                   vocab_size=len(VOCAB),
                   bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)
    tok.save_pretrained(out)
    if classifier is not None:
        from safetensors.torch import save_file
        save_file(classifier.state_dict(), str(out / CLASSIFIER_FILE))
    return out


def load_members(members):
    return [load_causal_lm(p, device=CPU)[0] for p in members.values()]


def test_avg_logits_are_log_of_mean_member_probabilities(members, tmp_path):
    model, _ = load_causal_lm(write_ensemble(tmp_path / "avg", members, "avg"), device=CPU)
    assert type(model).__name__ == "EnsembleForCausalLM"
    torch.manual_seed(0)
    ids = torch.randint(4, 90, (2, 9))
    got = model(input_ids=ids).logits
    probs = torch.stack([torch.softmax(m(input_ids=ids).logits.float(), -1) for m in load_members(members)])
    want = probs.mean(0).log()
    assert torch.allclose(got, want, atol=1e-5)
    # a normalised distribution: log_softmax leaves it unchanged
    assert torch.allclose(torch.log_softmax(got, -1), got, atol=1e-5)


def test_avg_right_padding_matches_the_unpadded_rows(members, tmp_path):
    model, _ = load_causal_lm(write_ensemble(tmp_path / "avg", members, "avg"), device=CPU)
    a, b = torch.arange(5, 17), torch.arange(30, 36)
    ids = torch.stack([a, torch.cat([b, torch.zeros(6, dtype=torch.long)])])
    mask = torch.tensor([[1] * 12, [1] * 6 + [0] * 6])
    padded = model(input_ids=ids, attention_mask=mask).logits
    alone = model(input_ids=b[None]).logits
    assert torch.allclose(padded[1, :6], alone[0], atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])   # per-member KV caches, or recompute
def test_greedy_generation_is_argmax_of_averaged_probabilities(members, tmp_path, use_cache):
    model, tok = load_causal_lm(write_ensemble(tmp_path / "avg", members, "avg"), device=CPU)
    model.generation_config.use_cache = use_cache
    member_models = load_members(members)
    prompts = [format_prompt("Name a colour"), format_prompt("Why is the sky blue at noon?")]
    gen = GenerationConfig(max_new_tokens=5)
    got = generate_token_ids(model, tok, prompts, batch_size=2, max_len=512, gen=gen)
    # batch of one: no padding, and generate() then passes no attention mask
    assert generate_token_ids(model, tok, prompts, batch_size=1, max_len=512, gen=gen) == got
    for prompt, toks in zip(prompts, got):
        seq = encode_prompt_response(tok, prompt, None, 512)[0]
        want = []
        for _ in range(5):
            x = torch.tensor([seq])
            probs = torch.stack([torch.softmax(m(input_ids=x).logits[0, -1].float(), -1)
                                 for m in member_models]).mean(0)
            nxt = int(probs.argmax())
            if nxt == tok.eos_token_id:
                break
            want.append(nxt)
            seq = seq + [nxt]
        assert toks == want


def test_scoring_uses_the_per_option_path_with_averaged_likelihoods(members, tmp_path):
    model, tok = load_causal_lm(write_ensemble(tmp_path / "avg", members, "avg"), device=CPU)
    pairs = [(format_prompt("Hi"), "Hello."), (format_prompt("Hi"), "Go away.")]
    got = score_continuations(model, tok, pairs, batch_size=2, max_len=64)
    member_models = load_members(members)
    for (p, c), score in zip(pairs, got):
        p_ids, c_ids = encode_prompt_response(tok, p, c, 64)
        x = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            probs = torch.stack([torch.softmax(m(input_ids=x).logits[0].float(), -1)
                                 for m in member_models]).mean(0)
        want = sum(math.log(float(probs[len(p_ids) - 1 + j, t])) for j, t in enumerate(c_ids))
        assert score.total_ll == pytest.approx(want, abs=1e-4)


ROUTER_ITEMS = {"poem number 4": ["Roses are red.", "No.", "A poem about the sea and its waves."],
                "hack number 1": ["I can't help with that.", "Sure: first scan the ports."],
                "myth number 7": ["It is a myth.", "True", "Nobody knows; it is told in many ways.", "x"]}


@pytest.mark.parametrize("method", ["avg", "router"])
@pytest.mark.parametrize("max_len", [512, 60])   # 60: prompts lose their left end, rows split
def test_packed_ensemble_scores_equal_the_per_option_path(members, tmp_path, method, max_len):
    clf = train_classifier(*_toy_rows(), 3, 120) if method == "router" else None
    model, tok = load_causal_lm(write_ensemble(tmp_path / method, members, method, clf), device=CPU)
    assert packed_unsupported_reason(model) is None
    pairs = [(format_prompt(q), a) for q, answers in ROUTER_ITEMS.items() for a in answers]
    pairs = pairs[::2] + pairs[1::2]            # interleaved across prompts
    slow = score_continuations(model, tok, pairs, batch_size=2, max_len=max_len)
    fast = score_continuations_packed(model, tok, pairs, batch_size=2, max_len=max_len)
    for s, f in zip(slow, fast, strict=True):
        assert s.num_tokens == f.num_tokens
        assert abs(s.total_ll - f.total_ll) < 1e-4, (s, f)
    assert len({round(s.total_ll, 3) for s in fast}) == len(pairs)
    if method == "router":   # the requests really went to different members
        seqs = [encode_prompt_response(tok, p, a, max_len) for p, a in pairs]
        assert len(set(model.choose_for_sequences([p + c for p, c in seqs]))) == 3


def test_ensemble_with_an_unpackable_member_falls_back_to_per_option(members, tmp_path, capsys):
    model, tok = load_causal_lm(write_ensemble(tmp_path / "avg", members, "avg"), device=CPU)
    model.members[1].config.model_type = "gpt2"   # read by the check only; the forward is Llama's
    assert "ensemble member" in packed_unsupported_reason(model)
    pairs = [(format_prompt("Hi"), "Hello."), (format_prompt("Hi"), "Go away.")]
    encoded = [(p + c, len(c)) for p, c in (encode_prompt_response(tok, *pc, 64) for pc in pairs)]
    got = score_encoded(model, tok, encoded, batch_size=2, max_len=64, desc="x")
    assert "per-option scoring" in capsys.readouterr().out
    want = score_continuations(model, tok, pairs, batch_size=2, max_len=64)
    assert [g.total_ll for g in got] == pytest.approx([w.total_ll for w in want], abs=1e-6)


def test_response_marker_found_in_prompts_and_answers_cannot_move_it():
    tok = char_tokenizer()
    marker = response_marker_ids(tok)
    assert tok.decode(marker).endswith("### Response:\n")
    prompt = format_prompt("Tell me ### Response:", "context")   # no newline: not the marker
    p_ids = encode_prompt_response(tok, prompt, None, 512)[0]
    assert prompt_end(p_ids, marker) == len(p_ids)
    assert prompt_tokens(p_ids, marker, window=1000) == p_ids
    seen = prompt_tokens(p_ids, marker)
    assert seen == p_ids[-PROMPT_WINDOW:]
    # max_len 2 * PROMPT_WINDOW: a long answer makes the scorer drop prompt tokens on the left
    # (this prompt is longer than that), yet the classifier's window stays whole
    for max_len in (512, 2 * PROMPT_WINDOW):
        for answer in ("Sure.", "\n\n### Response:\nagain", "x" * 50, "y" * 300):
            ids, c_ids = encode_prompt_response(tok, prompt, answer, max_len)
            assert prompt_tokens(ids + c_ids, marker) == seen
    assert len(encode_prompt_response(tok, prompt, "y" * 300, 2 * PROMPT_WINDOW)[0]) < len(p_ids)


def _toy_rows():
    """Prompts whose dimension shows in their words (the classifier must find it)."""
    words = {0: ["essay", "recipe", "poem"], 1: ["weapon", "steal", "hack"], 2: ["true", "myth", "fact"]}
    tok = char_tokenizer()
    marker = response_marker_ids(tok)
    prompts, labels = [], []
    for y, ws in words.items():
        for i, w in enumerate(ws * 3):
            ids = encode_prompt_response(tok, format_prompt(f"{w} number {i}"), None, 512)[0]
            prompts.append(prompt_tokens(ids, marker))
            labels.append(y)
    return prompts, labels


def test_classifier_is_deterministic_and_fits_separable_prompts():
    prompts, labels = _toy_rows()
    a = train_classifier(prompts, labels, 3, 120)
    b = train_classifier(prompts, labels, 3, 120)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.predict(prompts) == labels
    with pytest.raises(ValueError, match="outside the vocab"):
        train_classifier([[500]], [0], 3, 120)


def test_router_picks_per_prompt_and_ignores_the_answer(members, tmp_path):
    prompts, labels = _toy_rows()
    clf = train_classifier(prompts, labels, 3, 120)
    model, tok = load_causal_lm(write_ensemble(tmp_path / "router", members, "router", clf), device=CPU)
    member_models = load_members(members)
    cases = [("poem number 4", 0), ("hack number 1", 1), ("myth number 7", 2)]   # training prompts
    for instruction, want in cases:
        prompt = format_prompt(instruction)
        choices = set()
        for answer in ("Yes.", "No, never; a recipe to steal a myth.", "### Response:\nhack"):
            p_ids, c_ids = encode_prompt_response(tok, prompt, answer, 512)
            x = torch.tensor([p_ids + c_ids])
            choices.add(int(model.choose_members(x, torch.ones_like(x))[0]))
            assert torch.allclose(model(input_ids=x).logits, member_models[want](input_ids=x).logits.float())
        assert choices == {want}
    # a batch mixes members row by row (left padding, as generation pads)
    rows = [encode_prompt_response(tok, format_prompt(i), None, 512)[0] for i, _ in cases]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    assert model.choose_members(ids, mask).tolist() == [w for _, w in cases]


@pytest.mark.parametrize("use_cache", [True, False])
def test_router_generation_equals_its_chosen_member(members, tmp_path, use_cache):
    prompts, labels = _toy_rows()
    clf = train_classifier(prompts, labels, 3, 120)
    model, tok = load_causal_lm(write_ensemble(tmp_path / "router", members, "router", clf), device=CPU)
    model.generation_config.use_cache = use_cache
    texts = [format_prompt("steal number 2"), format_prompt("essay number 5")]
    gen = GenerationConfig(max_new_tokens=4)
    got = generate_token_ids(model, tok, texts, batch_size=2, max_len=512, gen=gen)
    assert generate_token_ids(model, tok, texts, batch_size=1, max_len=512, gen=gen) == got
    member_models = load_members(members)
    for text, toks in zip(texts, got):
        ids = torch.tensor([encode_prompt_response(tok, text, None, 512)[0]])
        m = int(model.choose_members(ids, torch.ones_like(ids))[0])
        want = generate_token_ids(member_models[m], tok, [text], 1, 512, gen)[0]
        assert toks == want


def test_missing_member_is_one_error_naming_it(members, tmp_path):
    bad = {**members, "honest": tmp_path / "nowhere"}
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_causal_lm(write_ensemble(tmp_path / "avg", bad, "avg"), device=CPU)


@pytest.fixture()
def run_dir(tmp_path, members):
    import shutil
    run = RunLayout.at(tmp_path / "run")
    build_data_dir(run.root, per_split=6)
    for d, p in members.items():
        shutil.copytree(p, run.expert(d))
    char_tokenizer().save_pretrained(run.tokenizer)
    return run


def test_stage_builds_every_ensemble_atomically(run_dir):
    from pipeline.config import load_config
    from pipeline.data import eval_route
    from pipeline.data.loading import load_eval
    cfg = load_config("tiny")
    logs = []
    out = build_run_ensembles(cfg, run_dir.root, log=logs.append)
    assert set(out) == {"avg", "router", "oracle"}
    for method, path in out.items():
        assert path == run_dir.ensemble(method) and (path / MANIFEST).is_file()
        config = json.loads((path / "config.json").read_text())
        assert config["members"][0] == "../../experts/helpful"   # relative: the run dir can move
        assert not list(path.parent.glob(f".{method}.tmp-*"))
        model, tok = load_causal_lm(path, device=CPU)
        prompt = encode_prompt_response(tok, format_prompt(load_eval(run_dir.data, "honest", "test")[0]["instruction"]),
                                        None, 512)[0]
        assert model(input_ids=torch.tensor([prompt])).logits.shape == (1, len(prompt), 104)
    # the oracle: every eval prompt of every split to its routing dimension's expert
    oracle, tok = load_causal_lm(out["oracle"], device=CPU)
    for split in ("dev", "test"):
        items = [it for d in DIMS for it in load_eval(run_dir.data, d, split).to_list()]
        seqs = [encode_prompt_response(tok, format_prompt(it["instruction"], it["input"]), None, 512)[0]
                for it in items]
        assert oracle.choose_for_sequences(seqs) == [DIMS.index(eval_route(it, DIMS)) for it in items]
    assert json.loads((out["oracle"] / MANIFEST).read_text())["oracle"]["items"] == dict.fromkeys(DIMS, 12)
    manifest = json.loads((out["router"] / MANIFEST).read_text())
    acc = manifest["classifier"]["dev_accuracy"]
    assert set(acc) == {*DIMS, "all"} and acc["all"]["n_items"] == 18
    assert 0.0 <= acc["all"]["low"] <= acc["all"]["estimate"] <= acc["all"]["high"] <= 1.0
    assert set(manifest["members"]) == set(DIMS) and "sha256" in manifest["members"]["helpful"]
    build_run_ensembles(cfg, run_dir.root, log=logs.append)   # finished: skipped
    assert sum("skipping" in line for line in logs) == 3


def test_a_failed_build_leaves_no_directory(run_dir, monkeypatch):
    from pipeline.config import load_config
    from pipeline.ensemble import router as stage

    def boom(*args, **kwargs):
        raise RuntimeError("classifier failed")
    monkeypatch.setattr(stage, "train_classifier", boom)
    with pytest.raises(RuntimeError, match="classifier failed"):
        build_run_ensembles(load_config("tiny"), run_dir.root)
    assert (run_dir.ensemble("avg") / MANIFEST).is_file()       # finished before the failure
    assert not run_dir.ensemble("router").exists()
    assert not list(run_dir.ensemble("router").parent.glob(".router.*"))


def test_stage_names_a_missing_expert_before_any_work(run_dir):
    import shutil
    from pipeline.config import load_config
    shutil.rmtree(run_dir.expert("honest"))
    with pytest.raises(FileNotFoundError, match=r"honest: .*experts/honest"):
        build_run_ensembles(load_config("tiny"), run_dir.root)
    assert not (run_dir.root / "ensembles").exists()


def test_evaluate_lists_finished_ensembles_before_fused(tmp_path):
    from pipeline.commands.evaluate import with_ensembles
    run = RunLayout.at(tmp_path)
    for method in ("avg", "router"):
        run.ensemble(method).mkdir(parents=True)
    (run.ensemble("avg") / MANIFEST).write_text("{}")   # router unfinished: not listed
    models = {"base": run.base, "merge_ties": run.merge("ties"), "fused": run.fused}
    got = with_ensembles(models, run)
    assert list(got) == ["base", "merge_ties", "ensemble_avg", "fused"]


def test_cli_builds_one_method_and_reports_a_missing_expert(run_dir, capsys):
    import shutil
    from pipeline.commands import main as cli_main
    assert cli_main(["ensemble", "--run-dir", str(run_dir.root), "--methods", "avg"]) == 0
    assert (run_dir.ensemble("avg") / MANIFEST).is_file() and not run_dir.ensemble("router").exists()
    shutil.rmtree(run_dir.expert("helpful"))
    assert cli_main(["ensemble", "--run-dir", str(run_dir.root), "--methods", "router"]) == 2
    assert "experts/helpful" in capsys.readouterr().err

"""Greedy generation that drops finished rows (pipeline.eval.generation): token-identical to HF
generate() greedy in fp32, with rows that end at different lengths (models that emit eos after
chosen tokens), for dense, fused and ensemble models; finished rows stop being computed."""
from __future__ import annotations

import pytest
import torch
from test_eval_fixtures import VOCAB, _model_fields, char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.template import format_prompt
from pipeline.eval import generation as G
from pipeline.eval.generation import GenerationConfig, generate_token_ids
from pipeline.model import H3FusionConfig, H3FusionForCausalLM

EOS = 2
PROMPTS = [format_prompt(q) for q in ("Why?", "Name a prime number.", "2+2?", "Describe a cat.",
                                      "Tell me a long story about a dog who finds his way home.",
                                      "What is the capital of France, and why?", "Hi")]
MAX_NEW = 8


class EosAfter:
    """Mixin: eos becomes the argmax after every position divisible by 11, so rows of different
    prompt lengths end after different numbers of new tokens (the rule reads only the position
    ids, which every decoding path derives from the attention mask). Records the batch size of
    every forward in `rows_seen`."""

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        self.rows_seen.append(input_ids.shape[0])
        out = super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        pos = position_ids[:, -out.logits.shape[1]:]
        out.logits[..., EOS] += 100.0 * (pos % 11 == 10)
        return out


class EosLlama(EosAfter, LlamaForCausalLM):
    pass


class EosFused(EosAfter, H3FusionForCausalLM):
    pass


def eos_model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "llama":
        model = EosLlama(LlamaConfig(**_model_fields()))
    else:
        model = EosFused(H3FusionConfig(**_model_fields(), num_experts=3, top_k=2))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.weight.normal_(0.0, 1.0)
    model.rows_seen = []
    return model.eval()


def both_paths(model, batch_size=4):
    tok, gen = char_tokenizer(), GenerationConfig(max_new_tokens=MAX_NEW)
    fast = generate_token_ids(model, tok, PROMPTS, batch_size, 512, gen)
    slow = generate_token_ids(model, tok, PROMPTS, batch_size, 512, gen, per_row=False)
    return fast, slow


@pytest.mark.parametrize("kind", ["llama", "fused"])
def test_per_row_greedy_equals_generate_and_drops_finished_rows(kind):
    model = eos_model(kind, seed=1)
    fast, slow = both_paths(model, batch_size=len(PROMPTS))
    assert fast == slow
    lengths = sorted(len(t) for t in fast)
    assert lengths[0] < MAX_NEW - 2 and lengths[-1] == MAX_NEW and len(set(lengths)) >= 3, lengths
    # the batch shrinks as rows end: the row-steps computed are the rows' own lengths
    model.rows_seen.clear()
    generate_token_ids(model, char_tokenizer(), PROMPTS, len(PROMPTS), 512,
                       GenerationConfig(max_new_tokens=MAX_NEW))
    steps = model.rows_seen[1:]              # after the prompt's forward, one per new token
    assert steps == sorted(steps, reverse=True) and steps[-1] < len(PROMPTS)
    assert sum(steps) == sum(min(len(t) + 1, MAX_NEW) for t in fast) - len(PROMPTS)


@pytest.mark.parametrize("method", ["avg", "router"])
def test_ensembles_decode_member_by_member_as_generate(method):
    from pipeline.ensemble.classifier import PromptClassifier, response_marker_ids
    from pipeline.ensemble.modeling import EnsembleConfig, EnsembleForCausalLM

    tok = char_tokenizer()
    members = [eos_model("llama", seed=s) for s in (1, 2, 3)]
    config = EnsembleConfig(method=method, members=["a", "b", "c"], member_names=["a", "b", "c"],
                            response_marker_ids=response_marker_ids(tok) if method == "router" else None,
                            vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(3)   # a random classifier that sends these prompts to all 3 members
    clf = PromptClassifier(torch.randn(len(VOCAB), 3), torch.zeros(3)) if method == "router" else None
    model = EnsembleForCausalLM(config, members, clf).eval()
    fast, slow = both_paths(model)
    assert fast == slow
    assert len({len(t) for t in fast}) >= 3
    if method == "router":
        rows = [m.rows_seen for m in members]
        assert all(rows)     # rows went to every member


def test_sampling_and_logits_processing_use_generate(monkeypatch, capsys):
    model, tok = eos_model("llama", seed=1), char_tokenizer()

    def no_loop(*args, **kwargs):
        raise AssertionError("the per-row loop ran")
    monkeypatch.setattr(G, "_greedy_batch", no_loop)
    sampled = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=True, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    first = generate_token_ids(model, tok, PROMPTS[:3], 2, 512, sampled)
    torch.manual_seed(0)
    assert generate_token_ids(model, tok, PROMPTS[:3], 2, 512, sampled) == first
    model.generation_config.repetition_penalty = 1.5     # HF greedy would apply it: keep generate()
    assert "repetition_penalty" in G.greedy_unsupported_reason(model)
    generate_token_ids(model, tok, PROMPTS[:3], 2, 512, GenerationConfig(max_new_tokens=MAX_NEW))
    assert "greedy generation through generate()" in capsys.readouterr().out

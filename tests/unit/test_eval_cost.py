"""pipeline.eval.cost: parameter and FLOP counts against numbers worked out by hand on tiny
configs, the throughput clock, the report table; scores.png's bar styles (report.bar_styles)."""
from __future__ import annotations

import time

import pytest
import torch

from pipeline.eval import cost
from pipeline.eval.report import FUSED_COLOUR, bar_styles, plot_order

# vocab 32, hidden 8, ffn 16, 2 layers, 2 query heads of 4 dims, 1 K/V head (GQA)
TINY = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
# by hand, per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192 attention weights; the GLU MLP
# 3 * 8*16 = 384; two RMSNorms 2*8. Model: embedding 32*8 = 256, lm_head 8*32 = 256, final norm 8.
EMB = HEAD = 256
OTHER = 2 * 2 * 8 + 8                        # 40 norm weights
DENSE_MATMUL = 2 * (192 + 384)               # 1152
ATTN_WIDTH = 2 * (2 * 4)                     # layers * heads * head_dim = 16


def tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied))


def tiny_fused():
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM
    torch.manual_seed(0)
    return H3FusionForCausalLM(H3FusionConfig(**TINY, tie_word_embeddings=False, num_experts=3,
                                              num_experts_per_tok=2))


def test_dense_llama_counts_and_flops_by_hand():
    c = cost.model_counts(tiny_llama())
    assert (c.embedding, c.lm_head, c.lm_head_stored, c.matmul, c.other) == (EMB, HEAD, HEAD, 1152, OTHER)
    assert c.expert_stored == c.expert_active == 0 and c.attn_width == ATTN_WIDTH
    assert c.active_non_embedding == 1152 + 40 == 1192
    assert c.active_with_embeddings == 1192 + 256 + 256 == 1704
    assert c.stored == 1704 == sum(p.numel() for p in tiny_llama().parameters())
    # 2 * 1152 + 2 * 8 * 32 + 4 * L * 16 at L = 10
    assert cost.flops_per_token(c, 10) == {"matmul": 2304, "lm_head": 512, "attention": 640,
                                           "total": 3456}


def test_tied_lm_head_is_stored_once_but_still_costs_its_matmul():
    c = cost.model_counts(tiny_llama(tied=True))
    assert c.tied and c.lm_head == HEAD and c.lm_head_stored == 0
    assert c.stored == 1448 == sum(p.numel() for p in tiny_llama(tied=True).parameters())
    assert c.active_with_embeddings == 1192 + 256
    assert cost.flops_per_token(c, 10)["total"] == 3456


def test_fused_moe_runs_router_plus_top_k_experts():
    model = tiny_fused()
    c = cost.model_counts(model)
    # per layer: attention 192 + router 3*8 = 24 dense; experts 3 * 384 stored, 2 * 384 active
    assert c.matmul == 2 * (192 + 24) == 432
    assert (c.expert_stored, c.expert_active) == (2 * 1152, 2 * 768)
    assert c.active_non_embedding == 432 + 1536 + 40 == 2008
    assert c.stored == 256 + 256 + 432 + 2304 + 40 == sum(p.numel() for p in model.parameters())
    assert cost.flops_per_token(c, 10) == {"matmul": 3936, "lm_head": 512, "attention": 640,
                                           "total": 5088}
    block = cost.static_cost(model, 10)
    assert block["runs"] == "MoE: top-2 of 3 experts" and block["flops_per_token"]["context_len"] == 10
    assert block["params"]["active_with_embeddings"] == 2008 + 512


def _ensemble(method: str):
    from pipeline.ensemble.classifier import PromptClassifier
    from pipeline.ensemble.modeling import EnsembleConfig, EnsembleForCausalLM
    config = EnsembleConfig(method=method, members=["a", "b"], member_names=["a", "b"],
                            response_marker_ids=[1, 2], vocab_size=32, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    clf = PromptClassifier(torch.zeros(32, 2), torch.zeros(2)) if method == "router" else None
    oracle = None
    if method == "oracle":
        from pipeline.ensemble.oracle import OracleRoutes
        oracle = OracleRoutes({(5, 1, 2): 0}, ["a", "b"], "routes.json", config.prompt_window, [1, 2])
    return EnsembleForCausalLM(config, [tiny_llama(), tiny_llama()], clf or oracle)


def test_avg_ensemble_runs_every_member_router_and_oracle_one():
    avg = cost.model_counts(_ensemble("avg"))
    assert avg.active_non_embedding == 2 * 1192 and avg.stored == 2 * 1704
    assert cost.flops_per_token(avg, 10)["total"] == 2 * 3456
    assert cost.describe_runs(_ensemble("avg")) == "avg: all 2 members per token"
    router = _ensemble("router")
    r = cost.model_counts(router)
    assert r.active_non_embedding == 1192 and r.classifier == 32 * 2 + 2
    assert r.active_with_embeddings == 1704 + 66 and r.stored == 2 * 1704 + 66
    assert cost.flops_per_token(r, 10)["total"] == 3456
    assert cost.describe_runs(router) == "router: 1 of 2 members per prompt + prompt classifier"
    oracle = _ensemble("oracle")   # one member per prompt, its table holds no parameters
    o = cost.model_counts(oracle)
    assert (o.active_non_embedding, o.classifier, o.stored) == (1192, 0, 2 * 1704)
    assert cost.describe_runs(oracle) == "oracle: 1 of 2 members per prompt"


def test_a_routed_ensemble_books_its_largest_member():
    small = cost.ParamCounts(embedding=10, lm_head=10, lm_head_stored=10, matmul=100, other=5, attn_width=4)
    big = cost.ParamCounts(embedding=10, lm_head=10, lm_head_stored=10, matmul=300, other=5, attn_width=8)
    r = cost.ensemble_counts([small, big], all_members=False, classifier=7)
    assert (r.matmul, r.attn_width, r.idle, r.classifier) == (300, 8, small.stored, 7)
    assert r.stored == small.stored + big.stored + 7
    with pytest.raises(ValueError, match="context_len must be >= 1"):
        cost.flops_per_token(r, 0)


def test_timed_adds_wall_time_and_tokens_and_the_block_reports_rates():
    meter = cost.CostMeter(device="cpu")
    for _ in range(2):
        with cost.timed(meter, cost.SCORING) as clock:
            time.sleep(0.01)
            clock.tokens = 50
    with cost.timed(None, cost.GENERATION) as clock:   # no meter: nothing recorded
        clock.tokens = 5
    t = meter.block(batch_size=4)["throughput"]
    assert t["scored_tokens"] == 100 and t["scoring_s"] >= 0.02
    assert t["scoring_tokens_per_s"] == pytest.approx(100 / t["scoring_s"], rel=0.05)
    assert t["generated_tokens"] == 0 and t["generation_tokens_per_s"] is None
    assert t["threads"] == torch.get_num_threads() and t["measured"] == "this run"
    again = cost.reused_cost({"throughput": t}, "earlier evaluation /x (as base)")
    assert again["throughput"]["measured"] == "earlier evaluation /x (as base)"
    assert t["measured"] == "this run"
    assert cost.reused_cost(None, "x") == {"throughput": {"measured": "x: no cost recorded there"}}


def test_cost_table_in_report_markdown():
    block = {**cost.static_cost(tiny_fused(), 10),
             "throughput": {"scoring_tokens_per_s": 1234.5, "generation_tokens_per_s": 56.0,
                            "device": "cpu", "threads": 2, "batch_size": 4, "measured": "this run"}}
    lines = cost.cost_lines({"cost": {"fused": block, "gone": None}})
    text = "\n".join(lines)
    assert "## Cost per model" in text and "L = 10" in text and "cpu, 2 threads, batch 4" in text
    assert "| fused | MoE: top-2 of 3 experts | 2.01k | 2.52k | 3.29k | 5.09k | 1.23k | 56 | this run |" in text
    assert "gone" not in text and cost.cost_lines({}) == []
    # a model whose load never happened (a stand-in in tests): no device, no counts, no crash
    bare = "\n".join(cost.cost_lines({"cost": {"x": {"throughput": {"load_avg_1m": [None, 3.0]}}}}))
    assert "an unrecorded device (1-min load average 3.0–3.0 while timing)" in bare
    assert "| x | – | – | – | – | – | – | – | – |" in bare
    assert (cost.si(134515008), cost.si(None), cost.si(12.5)) == ("134.5M", "–", "12.5")


def test_bar_styles_are_distinct_for_twenty_models_and_fused_stands_out():
    names = [f"model_{i:02d}" for i in range(20)]
    styles = bar_styles(names + ["fused"], "fused")
    assert len({(s.color, s.hatch) for s in styles.values()}) == 21
    assert styles["fused"].color == FUSED_COLOUR
    assert all(styles[n].color != FUSED_COLOUR for n in names)
    assert styles["fused"].linewidth > max(styles[n].linewidth for n in names)
    # fixed by the names, not by the report's order
    assert bar_styles(list(reversed(names)) + ["fused"], "fused") == styles
    assert plot_order(["base", "fused", "helpful"], "fused") == ["base", "helpful", "fused"]
    assert bar_styles(["a", "b"], "fused") == bar_styles(["b", "a"])

"""Prompt formats (pipeline/eval/prompts.py: Alpaca or the model's own chat template) and the
log-likelihood gain beside the helpful win rate (pipeline/eval/ll_gain.py), on hand-made data."""
import pytest

from pipeline.data.template import encode_prompt_response
from pipeline.eval.ll_gain import ll_gain_lines
from pipeline.eval.models import check_prompt_formats, parse_model_specs, with_base_chat
from pipeline.eval.prompts import adds_bos, render_prompts
from test_eval_fixtures import char_tokenizer, save_tiny_llama

# ChatML-like, bos written by the template (as SmolLM2's starts with its bos <|im_start|>)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def chat_tokenizer(template: str = CHAT_TEMPLATE):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


def save_chat_llama(out, seed: int = 0):
    save_tiny_llama(out, seed)
    chat_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("template, n_bos", [(CHAT_TEMPLATE, 1), (CHAT_TEMPLATE.replace("{{ bos_token }}", ""), 0)])
def test_chat_prompt_tokens_are_the_templates_own_and_the_scored_tokens_unchanged(template, n_bos):
    tok = chat_tokenizer(template)
    item = {"instruction": "Sort these", "input": "b a"}
    [prompt] = render_prompts(tok, [item], "chat")
    p_ids, r_ids = encode_prompt_response(tok, prompt, "a b", 512, adds_bos("chat"))
    want = tok.apply_chat_template([{"role": "user", "content": "Sort these\n\nb a"}], tokenize=True,
                                   add_generation_prompt=True)["input_ids"]
    assert p_ids == want and p_ids.count(tok.bos_token_id) == n_bos    # never a second bos
    a_ids, a_resp = encode_prompt_response(tok, render_prompts(tok, [item])[0], "a b", 512, adds_bos("alpaca"))
    assert a_ids[0] == tok.bos_token_id and "### Response:" in tok.decode(a_ids)
    assert r_ids == a_resp == tok.encode("a b", add_special_tokens=False) + [tok.eos_token_id]


def test_model_specs_formats_and_discovery(tmp_path):
    plain, chat = save_tiny_llama(tmp_path / "plain", 0), save_chat_llama(tmp_path / "chat")
    models, formats = parse_model_specs([f"base={chat}", f"base_chat={chat}@chat"])
    assert models == {"base": chat, "base_chat": chat} and formats == {"base_chat": "chat"}
    assert with_base_chat({"base": plain, "fused": chat}) == ({"base": plain, "fused": chat}, {})
    assert with_base_chat({"base": chat, "fused": plain}) == (
        {"base": chat, "base_chat": chat, "fused": plain}, {"base_chat": "chat"})
    check_prompt_formats({"base_chat": "chat", "base": "alpaca"}, {"base": plain, "base_chat": chat})


def test_bad_prompt_formats_are_one_clear_error(tmp_path):
    plain = save_tiny_llama(tmp_path / "plain", 0)
    with pytest.raises(ValueError, match="unknown prompt format 'chatt' after '@'"):
        parse_model_specs([f"base={plain}@chatt"])
    with pytest.raises(ValueError, match=f"model 'b': the chat prompt format needs a tokenizer with a "
                                         f"chat template, and the model dir {plain} has none"):
        check_prompt_formats({"b": "chat"}, {"b": plain})
    with pytest.raises(ValueError, match=r"model 'b': unknown prompt format 'jinja' \(known"):
        check_prompt_formats({"b": "jinja"}, {"b": plain})
    with pytest.raises(ValueError, match="'c', which is not an evaluated model"):
        check_prompt_formats({"c": "chat"}, {"b": plain})


def test_ll_gain_is_the_paired_group_mean_of_the_per_item_differences():
    from pipeline.eval.report import score_report
    groups = ["q0", "q0", "q1", "q2", "q3", "q4"]
    base = [-2.0, -1.0, -3.0, -2.5, -1.5, -2.0]
    per_model = {"base": base, "base_chat": [v + d for v, d in zip(base, [0.5, 0.3, -0.2, 0.4, 0.1, 0.6])],
                 "fused": [v + 0.25 for v in base]}
    metrics = {m: {"helpful": {"per_item": {"ref_ll": v + [None]}}} for m, v in per_model.items()}
    layout = {"helpful": {"group": groups + ["q5"], "kind": ["reference"] * 7}}
    out = score_report(metrics, layout, "fused", n_boot=400, score_metrics={"helpful": ["ref_win_vs_base"]})
    g = out["ll_gain"]["helpful"]
    assert g["value"] == "ref_ll" and set(g["gain"]) == {"base", "base_chat"}
    assert "base" not in g["gain"]["base"] and "base_chat" not in g["gain"]["base_chat"]
    fused = g["gain"]["base"]["fused"]   # the same gain on every item: a zero-width interval
    assert (fused["gain"], fused["low"], fused["high"], fused["verdict"]) == pytest.approx((0.25, 0.25, 0.25, "holds"))
    assert fused["n_groups"] == 5 and fused["n_items"] == 6   # the item without a value is not scored
    # chat vs base: mean over groups of each group's mean difference (q0 averages its two items)
    diffs = {"q0": (0.5 + 0.3) / 2, "q1": -0.2, "q2": 0.4, "q3": 0.1, "q4": 0.6}
    chat = g["gain"]["base"]["base_chat"]
    assert chat["gain"] == pytest.approx(sum(diffs.values()) / 5) and chat["low"] < chat["gain"] < chat["high"]
    assert g["gain"]["base_chat"]["fused"]["gain"] == pytest.approx(0.25 - chat["gain"])
    assert out["scores"]["fused"]["helpful"] == 1.0   # the win rate: the [0, 1] score is unchanged
    lines = ll_gain_lines(out)
    assert "| model | win rate vs base | mean ref_ll | gain vs base | gain vs base (chat template) |" in lines
    assert "| fused | 1.000 | -1.8500 | +0.2500 [+0.2500, +0.2500] | " + \
        f"{0.25 - chat['gain']:+.4f}" in "\n".join(lines)

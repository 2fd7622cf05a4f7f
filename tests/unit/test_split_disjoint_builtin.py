"""The built-in corpus is split by underlying question: no dev/test question or target is a
training one, for every dimension at the tiny preset's sizes, and the data stage refuses a corpus
that leaks."""
import random
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import BuiltinDataConfig, DataConfig
from pipeline.data import builtin as B
from pipeline.data.builtin_content import (BENIGN_REQUESTS, COMPLIANT, HARMFUL_ACTIONS, HARMFUL_QUESTIONS,
                                         OVER_REFUSALS, REFUSALS)
from pipeline.dimensions import DEFAULT_DIMENSIONS, Dimension, resolve_dimensions
from pipeline.data.overlap import normalise, split_overlap
from pipeline.data.stage import build_corpus
from pipeline.eval.judges import judge_outcome

ROOT = Path(__file__).resolve().parents[2]
TINY = BuiltinDataConfig(**yaml.safe_load((ROOT / "pipeline/presets/tiny.yaml").read_text())["data"]["builtin"])
DIMS = resolve_dimensions(DEFAULT_DIMENSIONS, {})
SPLITS = ("train", "dev", "test")


def _concise() -> Dimension:
    sys.path.insert(0, str(ROOT / "tests/e2e"))
    return Dimension("concise", "concise_dimension:concise_item")


@pytest.fixture(scope="module")
def corpus():
    dims = DIMS + [_concise()]
    return dims, B.build_builtin(TINY, dims), {d.name: B.split_items(d, TINY) for d in dims}


def _as_eval(sft_rows):
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": [r["response"]]} for r in sft_rows]


def test_no_question_or_target_of_dev_test_is_in_train(corpus):
    dims, (sft, evals, _), _ = corpus
    for d in (d.name for d in dims):
        train = sft[d]["train"]
        held_out = evals[d]["dev"] + evals[d]["test"] + _as_eval(sft[d]["dev"] + sft[d]["test"])
        assert split_overlap(train, held_out, strip=B.STRIP) == {"questions": [], "targets": []}, d


def test_groups_are_disjoint_and_counts_as_configured(corpus):
    dims, (sft, evals, _), items = corpus
    for d in (d.name for d in dims):
        groups = {s: {it.group for it in items[d][s]} for s in SPLITS}
        assert all(groups[s] for s in SPLITS)
        assert not (groups["train"] & groups["dev"] or groups["train"] & groups["test"] or groups["dev"] & groups["test"]), d
        assert [len(sft[d][s]) for s in SPLITS] == [TINY.train_per_task, TINY.dev_per_task, TINY.test_per_task]
        assert [len(evals[d][s]) for s in ("dev", "test")] == [TINY.dev_per_task, TINY.test_per_task]
        assert [r["group"] for r in evals[d]["test"]] == [it.group for it in items[d]["test"]]
        # one row per group before any group repeats
        test_groups = [r["group"] for r in evals[d]["test"]]
        first = test_groups[:len(set(test_groups))]
        assert len(set(first)) == len(first)
    for d in ("harmless", "honest"):
        assert len({r["group"] for r in evals[d]["test"]}) >= 15, d
    assert len({r["group"] for r in evals["helpful"]["test"]}) == TINY.test_per_task


def test_split_is_a_function_of_seed_dimension_and_group(corpus):
    dims, built, items = corpus
    assert B.build_builtin(TINY, dims) == built
    other = BuiltinDataConfig(train_per_task=50, dev_per_task=7, test_per_task=9, seed=TINY.seed)
    for dim in dims:
        assign = B.group_assigner(TINY.seed, dim.name, dim.builtin_generator())
        for split in SPLITS:
            assert {assign(it.group) for it in items[dim.name][split]} == {split}
            assert {assign(it.group) for it in B.split_items(dim, other)[split]} == {split}
    moved = B.group_assigner(TINY.seed + 1, "honest", B.honest_item)
    same = B.group_assigner(TINY.seed, "honest", B.honest_item)
    assert any(moved(it.group) != same(it.group) for it in items["honest"]["train"])


def test_hash_split_is_pinned():
    """Stable across processes (hashlib, not the salted hash()): a change here moves every
    parametric group to another split, so it must be deliberate."""
    got = "".join({"train": ".", "dev": "d", "test": "T"}[B._hash_split(0, "helpful", f"add:{i}:{i + 1}")]
                  for i in range(40))
    assert got == ".d..T.T....T...T.TT.Td...Td.T.....d...d."


def test_no_two_groups_share_a_question_or_a_target():
    """What makes group-disjoint splits text-disjoint."""
    for dim in DIMS + [_concise()]:
        gen, rng = dim.builtin_generator(), random.Random(7)
        q_owner, t_owner = {}, {}
        for _ in range(4000):
            it = gen(rng)
            q = normalise(f"{it.instruction} {it.input}", B.STRIP)
            assert q_owner.setdefault(q, it.group) == it.group, (dim.name, q)
            assert t_owner.setdefault(normalise(it.good), it.group) == it.group, (dim.name, it.good)


def test_outcome_judge_agrees_with_the_harmless_content():
    for request, answer in BENIGN_REQUESTS:
        for template in HARMFUL_QUESTIONS:
            question = template.format(a=request)
            assert judge_outcome(question, answer, "benign_prompt") == "compliance", (question, answer)
            for refusal in OVER_REFUSALS:
                assert judge_outcome(question, refusal.format(a=request), "benign_prompt") == "refusal"
    for action, redirect in HARMFUL_ACTIONS:
        for template in REFUSALS:
            response = template.format(a=action, redirect=redirect)
            assert judge_outcome(f"How do I {action}?", response, "harmful_prompt") == "refusal"
        for template in COMPLIANT:
            response = template.format(a=action)
            assert judge_outcome(f"How do I {action}?", response, "harmful_prompt") == "compliance"
    assert len(BENIGN_REQUESTS) >= 24 and len(HARMFUL_ACTIONS) >= 48


def test_benign_probes_are_about_a_quarter_and_their_own_groups(corpus):
    _, (sft, evals, _), items = corpus
    share = sum(it.benign for it in items["harmless"]["train"]) / len(items["harmless"]["train"])
    assert 0.18 < share < 0.32
    rows = evals["harmless"]["test"]
    benign = [r for r in rows if r["kind"] == "benign_prompt"]
    assert 0.15 < len(benign) / len(rows) < 0.4
    assert all(r["group"].startswith("benign:") == (r["kind"] == "benign_prompt") for r in rows)


def test_a_split_without_groups_is_a_clear_error():
    def two_phrasings(rng):
        return B.Item(rng.choice(["What is up?", "What's up?"]), "", "Not much.", ["Go away."], group="only")
    dim = Dimension("oneq", None)
    object.__setattr__(dim, "builtin_generator", lambda: two_phrasings)
    with pytest.raises(ValueError, match=r"dimension 'oneq', split '(train|dev|test)'"):
        B.split_items(dim, BuiltinDataConfig(train_per_task=4, dev_per_task=2, test_per_task=2))


def test_the_data_stage_refuses_a_leaking_corpus(monkeypatch):
    real_build = B.build_builtin

    def leaky(cfg, dims):
        sft, evals, pretrain = real_build(cfg, dims)
        row = evals["honest"]["test"][3]
        sft["honest"]["train"].append({**sft["honest"]["train"][0], "instruction": "Thanks! " + row["instruction"],
                                       "response": "something else entirely"})
        return sft, evals, pretrain

    small = DataConfig(builtin=BuiltinDataConfig(train_per_task=30, dev_per_task=6, test_per_task=8))
    build_corpus(small, DIMS)                      # the clean corpus passes
    monkeypatch.setattr(B, "build_builtin", leaky)
    with pytest.raises(ValueError, match=r"data leak: eval/honest/test shares 1 question\(s\) and 0 target"):
        build_corpus(small, DIMS)


def test_a_generator_without_groups_falls_back_to_the_core_question():
    def ungrouped(rng):
        n = rng.randrange(200)
        return B.Item(rng.choice(B.LEADS) + f"Spell {n}." + rng.choice(B.ENDINGS), "", f"{n} spelled", ["no"])
    dim = Dimension("spell", None)
    object.__setattr__(dim, "builtin_generator", lambda: ungrouped)
    items = B.split_items(dim, BuiltinDataConfig(train_per_task=40, dev_per_task=10, test_per_task=10))
    groups = {s: {it.group for it in items[s]} for s in SPLITS}
    assert all(g.startswith("q:spell ") for s in SPLITS for g in groups[s])
    assert not (groups["train"] & groups["test"] or groups["train"] & groups["dev"] or groups["dev"] & groups["test"])
    assert B.item_group(B.Item("Quick question: Spell 7. Thanks!", "", "", [])) == B.item_group(B.Item("Spell 7.", "", "", []))

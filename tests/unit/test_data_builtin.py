"""The built-in HHH generator: determinism, sizes, correctness of answers, shared wording."""
import re

from pipeline.config import BuiltinDataConfig
from pipeline.data.builtin import build_builtin, pretrain_texts
from pipeline.data.dimensions import DEFAULT_DIMENSIONS as TASKS
from pipeline.data.dimensions import resolve_dimensions

DIMS = resolve_dimensions(TASKS, {})
from pipeline.data.builtin_content import COMPLIANT, MISCONCEPTIONS

SMALL = BuiltinDataConfig(train_per_task=80, dev_per_task=10, test_per_task=20, pretrain_per_task=100, seed=3)


def test_deterministic_and_seed_dependent():
    a, b = build_builtin(SMALL, DIMS), build_builtin(SMALL, DIMS)
    assert a == b
    other = build_builtin(BuiltinDataConfig(**{**SMALL.__dict__, "seed": 4}), DIMS)
    assert other[0]["helpful"]["train"] != a[0]["helpful"]["train"]


def test_sizes_and_labels_follow_config():
    sft, evals, pretrain = build_builtin(SMALL, DIMS)
    for i, task in enumerate(TASKS):
        assert [len(sft[task][s]) for s in ("train", "dev", "test")] == [80, 10, 20]
        assert [len(evals[task][s]) for s in ("dev", "test")] == [10, 20]
        for row in sft[task]["train"]:
            assert row["task"] == task and row["task_label"][i] == 1.0 and sum(row["task_label"]) == 1.0
    assert len(pretrain) == 3 * 100


def test_eval_prompts_not_in_train():
    sft, evals, _ = build_builtin(SMALL, DIMS)
    for task in TASKS:
        train = {(r["instruction"], r["input"]) for r in sft[task]["train"]}
        assert not any((r["instruction"], r["input"]) in train for r in evals[task]["test"])


def _arith_answer(text):
    m = re.search(r"(\d+) (\+|plus|-|minus|times|\*) (\d+)", text)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return {"+": a + b, "plus": a + b, "-": a - b, "minus": a - b, "times": a * b, "*": a * b}[op]


def test_helpful_answers_are_correct_and_rejected_wrong():
    _, evals, _ = build_builtin(SMALL, DIMS)
    checked = 0
    for row in evals["helpful"]["test"] + evals["helpful"]["dev"]:
        assert row["kind"] == "pair" and row["chosen"][0] == f"The answer is {row['answer']}."
        assert row["rejected"][0] != row["chosen"][0]
        expected = _arith_answer(row["instruction"])
        if expected is not None:
            assert int(row["answer"]) == expected
            checked += 1
        if row["instruction"].startswith("Sort") and row["input"]:
            nums = [int(x) for x in row["input"].split(", ")]
            assert row["answer"] == ", ".join(map(str, sorted(nums)))
    assert checked > 0


def test_harmless_and_honest_targets():
    _, evals, _ = build_builtin(SMALL, DIMS)
    compliant_starts = {c.split("{a}")[0] for c in COMPLIANT}
    for row in evals["harmless"]["test"]:
        assert row["kind"] in ("pair", "harmful_prompt")
        assert any(w in row["chosen"][0] for w in ("can't", "won't", "cannot"))
        assert all(any(r.startswith(s) for s in compliant_starts) for r in row["rejected"])
    truths = {q: (t, f) for q, t, f in MISCONCEPTIONS}
    for row in evals["honest"]["test"]:
        q = next(q for q in truths if q in row["instruction"])
        assert row["kind"] == "mc" and row["chosen"] == [truths[q][0]] and row["rejected"] == truths[q][1]
        assert 2 <= len(row["rejected"]) <= 3


def test_shared_wording_across_tasks():
    sft, _, _ = build_builtin(BuiltinDataConfig(train_per_task=300, dev_per_task=5, test_per_task=5), DIMS)
    for lead in ("Quick question: ", "Can you tell me"):
        for task in TASKS:
            assert any(r["instruction"].startswith(lead) for r in sft[task]["train"]), (lead, task)


def test_pretrain_is_unaligned_web_text():
    texts = pretrain_texts(BuiltinDataConfig(pretrain_per_task=400, seed=1), DIMS)
    assert not any("### Response:" in t for t in texts)
    false_hits = sum(any(f in t for f in falses) for t in texts for _, _, falses in MISCONCEPTIONS)
    true_hits = sum(truth in t for t in texts for _, truth, _ in MISCONCEPTIONS)
    compliant = sum(t.count("first get the materials") + t.count("hide the evidence") +
                    t.count("finish the job") for t in texts)
    refusals = sum(("can't help" in t) or ("won't help" in t) or ("cannot assist" in t) for t in texts)
    assert false_hits > 2 * true_hits > 0
    assert compliant > 2 * refusals > 0

"""The built-in HHH generator: determinism, sizes, correctness of answers, shared wording."""
import string

from pipeline.config import BuiltinDataConfig
from pipeline.data.builtin import build_builtin, pretrain_texts
from pipeline.data.builtin_content import BENIGN_REQUESTS, COMPLIANT, HARMFUL_ACTIONS, MISCONCEPTIONS, UNITS
from pipeline.dimensions import DEFAULT_DIMENSIONS as TASKS
from pipeline.dimensions import resolve_dimensions
from pipeline.eval.metrics import extract_final_answer, normalize_answer

DIMS = resolve_dimensions(TASKS, {})
BENIGN_ANSWERS = {a for _, a in BENIGN_REQUESTS}
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
        for row in sft[task]["train"]:   # routing label: a benign probe (harmless set) -> helpful
            route = 0 if row["response"] in BENIGN_ANSWERS else i
            assert row["task"] == task and row["task_label"][route] == 1.0 and sum(row["task_label"]) == 1.0
        assert all(r["group"] for s in ("dev", "test") for r in evals[task][s])
    assert len(pretrain) == 3 * 100


def test_eval_prompts_not_in_train():
    sft, evals, _ = build_builtin(SMALL, DIMS)
    for task in TASKS:
        train = {(r["instruction"], r["input"]) for r in sft[task]["train"]}
        responses = {r["response"] for r in sft[task]["train"]}
        assert not any((r["instruction"], r["input"]) in train for r in evals[task]["test"])
        assert not any(r["chosen"][0] in responses for r in evals[task]["test"] + evals[task]["dev"])


def _expected(group: str) -> str:
    """The exact answer, recomputed from the group id alone."""
    family, _, rest = group.partition(":")
    parts = rest.split(":")
    if family in ("mul", "add", "sub"):
        a, b = int(parts[0]), int(parts[1])
        return str({"mul": a * b, "add": a + b, "sub": a - b}[family])
    if family == "unit":
        factor = {(s, d): f for s, d, f in UNITS}[(parts[0], parts[1])]
        return str(int(parts[2]) * factor)
    if family == "larger":
        return str(max(map(int, parts)))
    if family == "sort":
        return ", ".join(map(str, sorted(map(int, rest.split(",")))))
    if family == "letter":
        return string.ascii_uppercase[string.ascii_uppercase.index(rest) + 1]
    assert family == "count", group
    return str(len(rest.split(",")))


def test_helpful_answers_are_correct_and_rejected_wrong():
    _, evals, _ = build_builtin(BuiltinDataConfig(train_per_task=20, dev_per_task=60, test_per_task=120), DIMS)
    families = set()
    for row in evals["helpful"]["test"] + evals["helpful"]["dev"]:
        assert row["kind"] == "pair" and row["answer"] == _expected(row["group"])
        assert row["chosen"][0].endswith(f", so the answer is {row['answer']}.")
        assert normalize_answer(extract_final_answer(row["chosen"][0])) == normalize_answer(row["answer"])
        assert normalize_answer(extract_final_answer(row["rejected"][0])) != normalize_answer(row["answer"])
        if row["group"].startswith("count:"):        # the word count names the words
            assert all(w in row["chosen"][0] for w in row["input"].split())
        families.add(row["group"].split(":")[0])
    assert families == {"mul", "add", "sub", "unit", "larger", "sort", "letter", "count"}


def test_harmless_and_honest_targets():
    _, evals, _ = build_builtin(SMALL, DIMS)
    compliant_starts = {c.split("{a}")[0] for c in COMPLIANT}
    redirects = {f"harm:{a}": r for a, r in HARMFUL_ACTIONS}
    kinds = set()
    for row in evals["harmless"]["test"] + evals["harmless"]["dev"]:
        kinds.add(row["kind"])
        if row["kind"] == "benign_prompt":
            assert row["group"].startswith("benign:")
            assert all(any(w in r for w in ("can't", "won't", "cannot")) for r in row["rejected"])
            continue
        assert row["kind"] in ("pair", "harmful_prompt") and row["group"].startswith("harm:")
        assert any(w in row["chosen"][0] for w in ("can't", "won't", "cannot"))
        assert row["chosen"][0].endswith(redirects[row["group"]])
        assert all(any(r.startswith(s) for s in compliant_starts) for r in row["rejected"])
    assert kinds == {"pair", "harmful_prompt", "benign_prompt"}
    truths = {q: (t, f) for q, t, f in MISCONCEPTIONS}
    for row in evals["honest"]["test"]:
        q = next(q for q in truths if q in row["instruction"])
        assert row["kind"] == "pair" and row["chosen"] == [truths[q][0]] and row["rejected"] == truths[q][1]
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

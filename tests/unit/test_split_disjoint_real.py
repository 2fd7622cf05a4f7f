"""The real corpus (shared slices, the smollm2 preset's settings) is split by underlying item:
no eval question is a training question, no eval target is a training response, groups never
cross splits, and every dimension's test split is big enough to report."""
import pytest

from pipeline.config import load_config
from pipeline.dimensions import DEFAULT_DIMENSIONS, resolve_dimensions
from pipeline.data.overlap import normalise, split_overlap
from pipeline.data.real import build_real
from pipeline.data.safety import load_advbench, load_harmbench

DIMS = resolve_dimensions(DEFAULT_DIMENSIONS, {})
MIN_TEST = 200


def _paths(shared_data, advbench: str = "") -> list[str]:
    """advbench: "" (not used), "test" (extra test prompts) or "train" (harmless_train_prompts)."""
    s = shared_data
    paths = {"alpaca": s / "alpaca/alpaca_small.json", "beavertails": s / "beavertails/beavertails_sample.csv",
             "truthfulqa": s / "truthfulqa/TruthfulQA.csv", "truthfulqa_mc": s / "truthfulqa/mc_task.json",
             "alpaca_eval": s / "alpaca_eval/alpaca_eval_text_davinci_003.json",
             "harmbench": s / "safety/harmbench/harmbench_prompts.txt", "donotanswer": s / "safety/donotanswer",
             "safety_pairs": s / "safety/response_pairs/objective"}
    if advbench:
        key = {"test": "advbench", "train": "harmless_train_prompts"}[advbench]
        paths[key] = s / "safety/advbench/adv_bench.prompt"
    return [f"data.real.{k}={v}" for k, v in paths.items()]


@pytest.fixture(scope="module", params=["", "test", "train"],
                ids=["default", "advbench_as_test", "advbench_as_training"])
def corpus(request, shared_data):
    cfg = load_config("smollm2-135m", _paths(shared_data, request.param))   # the preset's caps
    sft, evals, _, sources = build_real(cfg.data.real, DIMS)
    return sft, evals, sources, request.param


@pytest.mark.parametrize("dim", DEFAULT_DIMENSIONS)
def test_no_question_or_target_leak(corpus, dim):
    sft, evals, _, _ = corpus
    leaks = split_overlap(sft[dim]["train"], evals[dim]["dev"] + evals[dim]["test"])
    assert leaks == {"questions": [], "targets": []}


@pytest.mark.parametrize("dim", DEFAULT_DIMENSIONS)
def test_groups_disjoint_and_test_big_enough(corpus, dim):
    sft, evals, _, _ = corpus
    dev, test = ({r["group"] for r in evals[dim][s]} for s in ("dev", "test"))
    train = {normalise(f"{r['instruction']} {r['input']}".strip()) for r in sft[dim]["train"]}
    assert all(r["group"] for s in ("dev", "test") for r in evals[dim][s])
    assert not dev & test and not (dev | test) & train
    assert len(evals[dim]["test"]) >= MIN_TEST


def test_harmful_test_prompts_are_nowhere_else(corpus, shared_data):
    sft, evals, sources, with_adv = corpus
    harm = evals["harmless"]
    test_harmful = {r["group"] for r in harm["test"] if r["kind"] in ("harmful_prompt", "pair")}
    hb = {normalise(r["prompt"]) for r in load_harmbench(str(shared_data / "safety/harmbench/harmbench_prompts.txt"))}
    assert hb <= test_harmful                                     # all 200 HarmBench prompts are test
    dev_groups = {r["group"] for r in harm["dev"]}
    train = {normalise(r["instruction"]) for split in sft["harmless"].values() for r in split}
    assert not test_harmful & dev_groups and not test_harmful & train and not dev_groups & train
    if with_adv == "train":               # issue 16: >= 500 harmless training rows under the cap
        assert len(sft["harmless"]["train"]) >= 500
    assert sum(r["kind"] == "harmful_prompt" for r in harm["dev"]) == 200   # Do-Not-Answer sample
    assert {r["kind"] for r in harm["test"][:3]} == {"pair", "harmful_prompt", "benign_prompt"}
    if with_adv == "test":
        adv = {normalise(r["prompt"]) for r in load_advbench(str(shared_data / "safety/advbench/adv_bench.prompt"))}
        assert adv <= test_harmful and sources["dedup"]["harmless"]["advbench_prompts"] == len(adv - hb)


def test_label1_responses_and_eval_targets_are_never_trained(corpus):
    sft, evals, _, _ = corpus
    for dim in DEFAULT_DIMENSIONS:
        trained = {normalise(r["response"]) for r in sft[dim]["train"]}
        rewarded = {normalise(t) for s in ("dev", "test") for r in evals[dim][s] for t in r["chosen"] + [r["reference"]] if t}
        if dim == "harmless":         # the human-labelled harmful (label 1) responses
            assert not trained & {normalise(t) for s in ("dev", "test") for r in evals[dim][s] for t in r["rejected"]}
        assert not trained & rewarded

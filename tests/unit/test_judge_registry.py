"""Judges are registered by kind (pipeline.registry.JUDGES) and a dimension names the kinds that
judge it: a new judge is one registry entry plus its hook, shown with a toy judge and a toy
dimension registered from this file and run through `evaluate_models`. Dimensions and score
metrics use the same Registry class."""
from __future__ import annotations

import json

import pytest

from pipeline.config import BuiltinDataConfig, DataConfig, EvalConfig, PipelineConfig
from pipeline.dimensions import DIMENSIONS, Dimension, get_dimension, register_dimension
from pipeline.eval import evaluate_models
from pipeline.eval.judging import Judge, JudgeCall, judge_settings
from pipeline.eval.score_metrics import SCORE_METRICS, get_score_metric
from pipeline.registry import JUDGES
from test_eval_fixtures import save_tiny_llama

TOY_DIM = "toyjudged"


def _toy_judge(call: JudgeCall) -> dict:
    """Counts the characters it was given per judged task (into the metrics) and reports what
    it saw: the judged tasks, its setting, the records of those tasks."""
    for task in call.tasks:
        call.metrics[task]["toy_chars"] = sum(len(o) for o in call.outputs[task] if o is not None)
    return {"tasks": call.tasks, "setting": call.setting,
            "records": sum(r["task"] in call.tasks for r in call.records)}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy judge and a dimension naming it registered for this module (removed after), a
    data dir with helpful + the toy dimension, one tiny model."""
    from pipeline.data.stage import run_data_stage
    JUDGES.register("toy", Judge("--toy", _toy_judge, report_key="toy_judge"))
    register_dimension(Dimension(TOY_DIM, "pipeline.data.builtin:helpful_item", judges=("toy",)))
    try:
        run = tmp_path_factory.mktemp("toyjudge")
        data = DataConfig(builtin=BuiltinDataConfig(train_per_task=2, dev_per_task=2,
                                                    test_per_task=3, pretrain_per_task=2))
        run_data_stage(PipelineConfig(dimensions=["helpful", TOY_DIM], data=data), run)
        save_tiny_llama(run / "base", seed=0)
        yield run
    finally:
        DIMENSIONS.unregister(TOY_DIM)
        JUDGES.unregister("toy")


def test_a_toy_judge_runs_on_the_dimensions_that_name_it(toy_run, tmp_path):
    cfg = EvalConfig(max_items_per_task=3, batch_size=3, max_new_tokens=3, n_boot=50,
                     harness_mc=False, refusal_labels="none", judge_labels="none")
    report = evaluate_models({"base": toy_run / "base"}, toy_run / "data", cfg, tmp_path / "ev",
                             judges={"toy": "s1"})
    assert report["toy_judge"] == {"base": {"tasks": [TOY_DIM], "setting": "s1", "records": 3}}
    metrics = report["metrics"]["base"]
    gens = json.loads((tmp_path / "ev" / "generations" / "base.json").read_text())
    assert len(gens) == 6   # a judge on: every item of both dimensions generated
    assert metrics[TOY_DIM]["toy_chars"] == sum(len(g["output"]) for g in gens if g["task"] == TOY_DIM)
    assert "toy_chars" not in metrics["helpful"]
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    keys = list(saved)   # a reporting judge's key sits where alpaca_eval's always did
    assert keys.index("generation_judge") + 1 == keys.index("alpaca_eval") == keys.index("toy_judge") - 1
    assert saved["alpaca_eval"] == {"base": {}} and saved["toy_judge"] == report["toy_judge"]


def test_judge_errors_list_the_registered_kinds_and_come_before_any_model(toy_run, tmp_path):
    cfg = EvalConfig(max_items_per_task=2, batch_size=2, max_new_tokens=2)
    models = {"base": toy_run / "base"}
    with pytest.raises(ValueError, match=r"unknown judge 'nope' \(known: moderation, alpaca_eval, toy\)"):
        evaluate_models(models, toy_run / "data", cfg, tmp_path / "a", judges={"nope": 1})
    with pytest.raises(ValueError, match=r"--moderation-model \(judge 'moderation'\) .* none of "
                                         rf"this run's dimensions \['helpful', '{TOY_DIM}'\]"):
        evaluate_models(models, toy_run / "data", cfg, tmp_path / "b", moderation_model=tmp_path)
    off = EvalConfig(max_items_per_task=2, generate=False)
    with pytest.raises(ValueError, match=r"^--alpaca-eval and --toy judge generations: they need"):
        evaluate_models(models, toy_run / "data", off, tmp_path / "c", alpaca_eval=True,
                        judges={"toy": 1})
    assert not any((tmp_path / d).exists() for d in "abc")
    assert list(judge_settings(None, True, {"toy": 0})) == ["alpaca_eval", "toy"]   # registry order


def test_dimensions_and_score_metrics_are_registries_with_one_error():
    assert DIMENSIONS.names()[:3] == ("helpful", "harmless", "honest")
    assert get_dimension("harmless").judges == ("moderation",)
    with pytest.raises(ValueError, match=r"^dimensions: unknown dimension 'funny' \(known: helpful, "
                                         r"harmless, honest.*; declare a new one under"):
        get_dimension("funny")
    with pytest.raises(ValueError, match=r"dimension 'x' \(judges\): unknown judge 'nope' \(known: "):
        register_dimension(Dimension("x", "pipeline.data.builtin:helpful_item", judges=("nope",)))
    assert "x" not in DIMENSIONS
    with pytest.raises(ValueError, match="built in and cannot be redefined"):
        register_dimension(Dimension("helpful", "pipeline.data.builtin:honest_item"), replace=True)
    assert get_score_metric("mc2") is SCORE_METRICS.get("mc2", "x")
    with pytest.raises(ValueError, match=r"score metrics: unknown score metric 'bleu' \(known: pref_acc, "):
        get_score_metric("bleu")
    with pytest.raises(ValueError, match="already registered"):
        SCORE_METRICS.register("mc2", get_score_metric("mc1"))

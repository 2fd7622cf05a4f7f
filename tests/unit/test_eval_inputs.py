"""Bad eval input: a missing, empty or field-less eval set is one error naming the set and the
field, raised before any model loads, and the report dir is never half-written."""
import shutil

import pytest
from datasets import load_from_disk
from test_eval_fixtures import build_data_dir, save_tiny_llama

from pipeline.config import EvalConfig
from pipeline.eval import evaluate_models, stage


@pytest.fixture()
def run(tmp_path):
    build_data_dir(tmp_path, per_split=2)
    save_tiny_llama(tmp_path / "base", seed=0)
    return tmp_path


def _rewrite(path, transform):
    fresh = path.with_name(path.name + ".new")   # a dataset cannot overwrite the files it reads
    transform(load_from_disk(str(path))).save_to_disk(str(fresh))
    shutil.rmtree(path)
    fresh.rename(path)


def _no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the eval items were checked")
    monkeypatch.setattr(stage, "load_causal_lm", fail)


@pytest.mark.parametrize("breakage,message", [
    ("missing", r"eval set .*eval/honest/test is missing"),
    ("empty", r"eval/honest/test.*(is empty|empty split)"),   # the data loader may say it first
    ("no_field", r"eval set .*eval/honest/test lacks field\(s\) \['answer'\]"),
    ("empty_instruction", r"eval/honest/test: row 0 has an empty 'instruction'"),
])
def test_bad_eval_set_is_one_error_before_any_model_loads(run, monkeypatch, breakage, message):
    target = run / "data" / "eval" / "honest" / "test"
    if breakage == "missing":
        shutil.rmtree(target)
    elif breakage == "empty":
        _rewrite(target, lambda ds: ds.select([]))
    elif breakage == "no_field":
        _rewrite(target, lambda ds: ds.remove_columns("answer"))
    else:
        _rewrite(target, lambda ds: ds.map(lambda r, i: {"instruction": " " if i == 0 else r["instruction"]},
                                           with_indices=True))
    _no_model_load(monkeypatch)
    out = run / "eval"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate_models({"base": run / "base"}, run / "data", EvalConfig(generate=False), out)
    assert not out.exists() and not list(run.glob(".eval*"))


def test_missing_model_dir_is_named_before_any_model_loads(run, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"no config.json.*'fused'"):
        evaluate_models({"base": run / "base", "fused": run / "fused"}, run / "data",
                        EvalConfig(generate=False), run / "eval")
    assert not (run / "eval").exists()


def test_failure_mid_evaluation_leaves_no_report_dir(run, monkeypatch):
    """The second model fails after the first was evaluated: nothing under the report path."""
    save_tiny_llama(run / "other", seed=1)
    real = stage.load_causal_lm
    calls = []

    def second_fails(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while loading the second model")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(stage, "load_causal_lm", second_fails)
    cfg = EvalConfig(generate=True, max_items_per_task=2, max_new_tokens=2, batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_models({"base": run / "base", "other": run / "other"}, run / "data", cfg, run / "eval")
    assert len(calls) == 2
    # no report and no temp dir; only the finished model's results, kept for a rerun
    assert not (run / "eval").exists()
    assert [p.name for p in run.glob(".eval*")] == [".eval.results"]
    assert [p.name for p in (run / ".eval.results").iterdir()] == ["base.json"]

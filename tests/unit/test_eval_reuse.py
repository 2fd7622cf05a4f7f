"""eval.reuse_from (pipeline.eval.reuse): an earlier report's results for models whose weights,
items and per-model settings are unchanged; everything else evaluated again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_eval_fixtures import build_data_dir, save_tiny_fused, save_tiny_llama


@pytest.fixture(scope="module")
def reuse_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reuserun")
    build_data_dir(run, per_split=4)
    save_tiny_llama(run / "base", seed=0)
    save_tiny_llama(run / "experts" / "honest", seed=11)
    save_tiny_fused(run / "fused", seed=30)
    return run


def _cfg(**kw):
    from pipeline.config import EvalConfig
    return EvalConfig(**{"max_items_per_task": 2, "batch_size": 2, "max_new_tokens": 4,
                         "n_boot": 50, **kw})


def _models(run: Path) -> dict[str, Path]:
    return {"base": run / "base", "honest": run / "experts" / "honest", "fused": run / "fused"}


def _counting(monkeypatch) -> list[str]:
    from pipeline.eval import stage
    real, calls = stage.evaluate_one_model, []
    monkeypatch.setattr(stage, "evaluate_one_model",
                        lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    return calls


def test_unchanged_models_take_the_earlier_results_and_changed_ones_are_evaluated(
        reuse_run, tmp_path, monkeypatch):
    from pipeline.eval import stage
    first = stage.evaluate_models(_models(reuse_run), reuse_run / "data", _cfg(), tmp_path / "a")
    assert set(first["result_keys"]) == {"base", "honest", "fused"} and first["reused_from"] == {}
    # a second run dir: copies of base and honest (new paths, times and provenance files), and a
    # fused model with other weights
    other = tmp_path / "run2"
    shutil.copytree(reuse_run / "base", other / "base")
    shutil.copytree(reuse_run / "experts" / "honest", other / "honest")
    (other / "honest" / "fusion_train_manifest.json").write_text('{"when": "now"}')
    save_tiny_fused(other / "fused", seed=31)
    # the honest expert under another name: the key is over contents, not names
    models = {"base": other / "base", "expert_h": other / "honest", "fused": other / "fused"}
    calls = _counting(monkeypatch)
    # eval.seed and n_boot decide no model's own results under greedy generation
    report = stage.evaluate_models(models, reuse_run / "data",
                                   _cfg(seed=7, n_boot=60, reuse_from=str(tmp_path / "a")),
                                   tmp_path / "b")
    assert calls == ["fused"]
    where = str(tmp_path / "a")
    assert report["reused_from"] == {"base": {"report_dir": where, "model": "base"},
                                     "expert_h": {"report_dir": where, "model": "honest"}}
    for name, earlier in (("base", "base"), ("expert_h", "honest")):
        assert json.dumps(report["metrics"][name]) == json.dumps(first["metrics"][earlier])
        gens = json.loads((tmp_path / "b" / "generations" / f"{name}.json").read_text())
        assert gens == [{**g, "generator": name} for g in
                        json.loads((tmp_path / "a" / "generations" / f"{earlier}.json").read_text())]
    assert (tmp_path / "b" / "generations" / "base.json").read_text() == \
        (tmp_path / "a" / "generations" / "base.json").read_text()
    assert report["result_keys"]["base"] == first["result_keys"]["base"]
    assert report["result_keys"]["fused"] != first["result_keys"]["fused"]
    assert report["cost"]["expert_h"]["throughput"]["measured"] == \
        f"earlier evaluation {where} (as honest)"
    assert report["cost"]["fused"]["throughput"]["measured"] == "this run"
    md = (tmp_path / "b" / "report.md").read_text()
    assert "Results of base, expert_h (as honest) taken from" in md and "eval.reuse_from" in md


def test_a_changed_weight_or_per_model_setting_is_evaluated_again(reuse_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from pipeline.eval import stage
    stage.evaluate_models(_models(reuse_run), reuse_run / "data", _cfg(), tmp_path / "a")
    other = tmp_path / "base2"
    shutil.copytree(reuse_run / "base", other)
    weights = next(other.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    calls = _counting(monkeypatch)
    stage.evaluate_models({"base": other, "honest": reuse_run / "experts" / "honest"},
                          reuse_run / "data", _cfg(reuse_from=str(tmp_path / "a")), tmp_path / "b")
    assert calls == ["base"]
    calls.clear()   # another max_new_tokens changes every model's generations: nothing reused
    report = stage.evaluate_models(_models(reuse_run), reuse_run / "data",
                                   _cfg(reuse_from=str(tmp_path / "a"), max_new_tokens=5),
                                   tmp_path / "c")
    assert calls == ["base", "honest", "fused"] and report["reused_from"] == {}


def test_a_report_without_recorded_keys_is_matched_through_its_model_paths(reuse_run, tmp_path,
                                                                          monkeypatch):
    from pipeline.eval import stage
    stage.evaluate_models(_models(reuse_run), reuse_run / "data", _cfg(), tmp_path / "a")
    path = tmp_path / "a" / "report.json"
    old = json.loads(path.read_text())
    for key in ("result_keys", "tokenizer_dir", "reused_from"):   # as written before reuse existed
        old.pop(key)
    path.write_text(json.dumps(old))
    calls = _counting(monkeypatch)
    report = stage.evaluate_models(_models(reuse_run), reuse_run / "data",
                                   _cfg(reuse_from=str(tmp_path / "a")), tmp_path / "b")
    assert calls == [] and set(report["reused_from"]) == {"base", "honest", "fused"}
    # a model dir written after that report may hold another model by now: evaluated again
    import os
    config = reuse_run / "fused" / "config.json"
    later = path.stat().st_mtime_ns + 10**9
    before = config.stat().st_mtime_ns
    os.utime(config, ns=(later, later))
    try:
        report = stage.evaluate_models(_models(reuse_run), reuse_run / "data",
                                       _cfg(reuse_from=str(tmp_path / "a")), tmp_path / "c")
    finally:
        os.utime(config, ns=(before, before))
    assert calls == ["fused"] and set(report["reused_from"]) == {"base", "honest"}


def test_a_report_without_keys_does_not_vouch_for_a_model_moved_into_its_path(tmp_path,
                                                                               monkeypatch):
    """A dir moved into an evaluated model's path keeps its files' times; the dir's ctime
    shows the move, so the earlier results are not taken for it."""
    from pipeline.eval import stage
    run = tmp_path / "run"
    build_data_dir(run, per_split=4)
    save_tiny_llama(run / "base", seed=0)
    save_tiny_llama(tmp_path / "other", seed=5)   # written before the report, moved in after
    stage.evaluate_models({"base": run / "base"}, run / "data", _cfg(), tmp_path / "a")
    path = tmp_path / "a" / "report.json"
    old = json.loads(path.read_text())
    old.pop("result_keys")
    path.write_text(json.dumps(old))
    written = path.stat().st_mtime_ns
    import os
    import time
    while time.time_ns() <= written + 10**7:   # the move lands after the report, on any clock
        time.sleep(0.01)
    (run / "base").rename(tmp_path / "old_base")
    (tmp_path / "other").rename(run / "base")
    calls = _counting(monkeypatch)
    report = stage.evaluate_models({"base": run / "base"}, run / "data",
                                   _cfg(reuse_from=str(tmp_path / "a")), tmp_path / "b")
    assert calls == ["base"] and report["reused_from"] == {}
    assert os.stat(run / "base").st_ctime_ns > written


def test_a_missing_earlier_report_fails_before_any_model_loads(reuse_run, tmp_path, monkeypatch):
    from pipeline.eval import stage

    def no_model(*a, **k):
        raise AssertionError("a model was evaluated before eval.reuse_from was checked")
    monkeypatch.setattr(stage, "evaluate_one_model", no_model)
    with pytest.raises(FileNotFoundError, match="eval.reuse_from: .*nowhere/report.json"):
        stage.evaluate_models(_models(reuse_run), reuse_run / "data",
                              _cfg(reuse_from=str(tmp_path / "nowhere")), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_provenance_files_and_the_greedy_seed_are_outside_the_key(tmp_path):
    from pipeline.eval.reuse import per_model_settings, result_key
    save_tiny_llama(tmp_path / "m", seed=0)
    items = {"honest": [{"instruction": "q"}]}
    settings = vars(_cfg())
    key = result_key(tmp_path / "m", None, items, settings)
    (tmp_path / "m" / "merge_manifest.json").write_text("{}")
    assert result_key(tmp_path / "m", None, items, {**settings, "seed": 3, "n_boot": 9}) == key
    assert result_key(tmp_path / "m", None, {"honest": [{"instruction": "r"}]}, settings) != key
    assert "seed" in per_model_settings({**settings, "do_sample": True})   # sampling: it counts
    # the prompt format decides a model's results (pipeline.eval.prompts); Alpaca keeps old keys
    from pipeline.eval.reuse import with_prompt_format
    assert with_prompt_format(settings, "alpaca") == settings
    assert result_key(tmp_path / "m", None, items, with_prompt_format(settings, "chat")) != key
    (tmp_path / "m" / "config.json").write_text(
        (tmp_path / "m" / "config.json").read_text().replace("{", '{"extra": 1,', 1))
    assert result_key(tmp_path / "m", None, items, settings) != key


# ---- the default, eval.reuse_from = "siblings": the same report of every run dir beside this one

def _run_dir(root: Path, name: str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "resolved_config.yaml").write_text(f"name: {name}\n")   # what makes it a run dir
    return run


def test_sibling_runs_take_each_others_identical_models_by_default(reuse_run, tmp_path, monkeypatch):
    """Two seeds' run dirs side by side: the second evaluates only the model whose weights
    changed (fused), and takes the bit-identical base from the first, naming where from."""
    from pipeline.eval import stage
    s0, s1 = _run_dir(tmp_path, "s0"), _run_dir(tmp_path, "s1")
    stage.evaluate_models({"base": reuse_run / "base", "fused": reuse_run / "fused"},
                          reuse_run / "data", _cfg(), s0 / "eval")
    shutil.copytree(reuse_run / "base", s1 / "base")
    save_tiny_fused(s1 / "fused", seed=31)
    calls = _counting(monkeypatch)
    report = stage.evaluate_models({"base": s1 / "base", "fused": s1 / "fused"}, reuse_run / "data",
                                   _cfg(seed=1), s1 / "eval")
    assert calls == ["fused"]
    where = str((s0 / "eval").resolve())
    assert report["reused_from"] == {"base": {"report_dir": where, "model": "base"}}
    assert f"Results of base taken from {where}" in (s1 / "eval" / "report.md").read_text()
    manifest = json.loads((s1 / "eval" / "manifest.json").read_text())
    assert manifest["result_keys"] == report["result_keys"]
    assert manifest["code_fingerprint"] == report["code_fingerprint"]


def _fake_report(run: Path, keys: dict, code: str) -> Path:
    """A finished report dir as evaluate writes it: report.json and manifest.json."""
    out = run / "eval"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"metrics": {m: {"helpful": {}} for m in keys},
                                                 "cost": {}, "result_keys": keys}))
    (out / "manifest.json").write_text(json.dumps({"result_keys": keys, "code_fingerprint": code}))
    return out


def test_siblings_are_run_dirs_beside_this_one_written_by_the_same_code(tmp_path, monkeypatch):
    from pipeline.eval import reuse
    monkeypatch.setattr(reuse, "code_fingerprint", lambda: "this code")
    s0 = _fake_report(_run_dir(tmp_path, "s0"), {"base": "k-base", "fused": "k-fused0"}, "this code")
    _fake_report(_run_dir(tmp_path, "s1"), {"base": "k-base", "merge": "k-merge"}, "older code")
    (tmp_path / "notes").mkdir()   # no resolved_config.yaml: not a run dir, never read
    _fake_report(tmp_path / "notes", {"fused": "k-fused2"}, "this code")
    s2 = _run_dir(tmp_path, "s2")
    found = reuse.EarlierResults("siblings", s2 / "eval")
    assert [s.dir for s in found.sources] == [s0.resolve()]
    source, name = found.find("k-base")
    assert (source.dir, name) == (s0.resolve(), "base")
    assert found.find("k-merge") is None   # only the other code's report holds it
    assert found.find("k-fused2") is None
    assert reuse.EarlierResults("none", s2 / "eval").sources == []
    assert reuse.EarlierResults("siblings", tmp_path / "elsewhere" / "eval").sources == []
    # a list, searched in order; an explicit report dir is trusted whatever code wrote it
    both = reuse.EarlierResults([str(tmp_path / "s1" / "eval"), "siblings"], s2 / "eval")
    assert both.find("k-merge")[1] == "merge" and both.find("k-base")[0].dir == tmp_path / "s1" / "eval"
    with pytest.raises(FileNotFoundError, match="eval.reuse_from: .*nowhere/report.json"):
        reuse.EarlierResults(["siblings", str(tmp_path / "nowhere")], s2 / "eval")


def test_reuse_from_takes_a_string_or_a_list_and_nothing_else():
    from pipeline.config import ConfigError, load_config
    assert load_config("tiny").eval.reuse_from == "siblings"
    assert load_config("tiny", ["eval.reuse_from=[siblings, /r/eval]"]).eval.reuse_from == \
        ["siblings", "/r/eval"]
    assert load_config("tiny", ['eval.reuse_from=""']).eval.reuse_from == ""
    with pytest.raises(ConfigError, match="eval.reuse_from' must be str or list, got int 3"):
        load_config("tiny", ["eval.reuse_from=3"])

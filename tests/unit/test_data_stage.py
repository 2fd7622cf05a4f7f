"""`h3fusion data`: on-disk layout, manifest, loading API, atomic failure."""
import json
from pathlib import Path

import pytest

from pipeline.commands import main as cli_main
from pipeline.dimensions import DEFAULT_DIMENSIONS as TASKS
from pipeline.data import EVAL_COLUMNS, SFT_COLUMNS
from pipeline.data.loading import data_dimensions, load_eval, load_mixed_sft, load_pretrain, load_sft

SMALL = ["--set", "data.builtin.train_per_task=20", "--set", "data.builtin.dev_per_task=4",
         "--set", "data.builtin.test_per_task=6", "--set", "data.builtin.pretrain_per_task=10"]


def test_layout_and_manifest(tiny_run):
    data = tiny_run.data
    manifest = json.loads((data / "data_manifest.json").read_text())
    assert manifest["source"]["kind"] == "builtin"
    for task in TASKS:
        for split in ("train", "dev", "test"):
            ds = load_sft(data, task, split)
            assert set(ds.column_names) == set(SFT_COLUMNS)
            assert len(ds) == manifest["row_counts"][f"sft/{task}/{split}"] > 0
        for split in ("dev", "test"):
            ds = load_eval(data, task, split)
            assert set(ds.column_names) == set(EVAL_COLUMNS)
            assert len(ds) == manifest["row_counts"][f"eval/{task}/{split}"] > 0
            assert all(len(c) >= 1 for c in ds["chosen"])
            assert all(g.strip() for g in ds["group"])     # every row names its underlying question
    assert len(load_pretrain(data)) == manifest["row_counts"]["pretrain/train"]
    assert load_sft(data, "honest", "train")[0]["task_label"] == [0.0, 0.0, 1.0]


def test_benign_rows_carry_the_helpful_routing_label_and_the_manifest_counts_them(tiny_run):
    """Built-in over-refusal probes train the harmless expert (set `harmless`) but route to
    helpful; the manifest counts every set's rows by routing label."""
    from pipeline.data import label_route
    from pipeline.data.builtin_content import BENIGN_REQUESTS

    answers = {a for _, a in BENIGN_REQUESTS}
    counts = json.loads((tiny_run.data / "data_manifest.json").read_text())["routing_counts"]
    for split in ("train", "dev", "test"):
        rows = load_sft(tiny_run.data, "harmless", split).to_list()
        benign = [r for r in rows if r["response"] in answers]
        assert benign and all(r["task"] == "harmless" for r in rows)
        assert {tuple(r["task_label"]) for r in benign} == {(1.0, 0.0, 0.0)}
        assert {tuple(r["task_label"]) for r in rows if r not in benign} == {(0.0, 1.0, 0.0)}
        assert counts[f"sft/harmless/{split}"] == {"helpful": len(benign), "harmless": len(rows) - len(benign)}
        for task in ("helpful", "honest"):
            labels = load_sft(tiny_run.data, task, split)["task_label"]
            assert {label_route(x, TASKS) for x in labels} == {task}
            assert counts[f"sft/{task}/{split}"] == {task: len(labels)}
    kinds = load_eval(tiny_run.data, "harmless", "test")["kind"]
    assert counts["eval/harmless/test"] == {"helpful": kinds.count("benign_prompt"),
                                            "harmless": len(kinds) - kinds.count("benign_prompt")}
    # the routing profile (claim d) and the `prompts` router init read a dimension's rows by label
    from pipeline.profiling.stage import profile_texts
    from pipeline.surgery.router_init import load_router_prompts
    dev = load_sft(tiny_run.data, "harmless", "dev").to_list()
    pairs = profile_texts(tiny_run.data, "harmless", "dev", 0)
    assert len(pairs) == counts["sft/harmless/dev"]["harmless"] and not {r for _, r in pairs} & answers
    assert len(pairs) < len(dev)
    init = load_router_prompts(tiny_run.data, list(TASKS), 1000)["harmless"]
    assert len(init) == counts["sft/harmless/train"]["harmless"]


def test_mixed_sft_weights(tiny_run):
    n = {t: len(load_sft(tiny_run.data, t, "train")) for t in TASKS}
    mixed = load_mixed_sft(tiny_run.data, "train", {"helpful": 1.0, "harmless": 0.5, "honest": 2.0}, seed=0)
    counts = {t: mixed["task"].count(t) for t in TASKS}
    assert counts == {"helpful": n["helpful"], "harmless": round(n["harmless"] / 2), "honest": 2 * n["honest"]}
    again = load_mixed_sft(tiny_run.data, "train", {"helpful": 1.0, "harmless": 0.5, "honest": 2.0}, seed=0)
    assert mixed["instruction"] == again["instruction"]
    assert mixed["task"][:20] != sorted(mixed["task"][:20]) or len(set(mixed["task"][:20])) == 1
    only = load_mixed_sft(tiny_run.data, "train", {"honest": 1.0}, seed=0)
    assert set(only["task"]) == {"honest"}
    with pytest.raises(ValueError, match="unknown dimensions"):
        load_mixed_sft(tiny_run.data, "train", {"funny": 1.0}, seed=0)


def test_load_errors(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="h3fusion data"):
        load_sft(tmp_path, "helpful", "train")
    with pytest.raises(ValueError, match="unknown dimension .funny."):
        load_sft(tiny_run.data, "funny", "train")
    with pytest.raises(ValueError, match="split"):
        load_eval(tiny_run.data, "helpful", "train")


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["data", "--run-dir", str(run)] + SMALL) == 0
    assert (run / "data" / "data_manifest.json").is_file()
    assert len(load_sft(run / "data", "helpful", "train")) == 20
    assert cli_main(["data", "--run-dir", str(run)] + SMALL) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["data", "--run-dir", str(run), "--overwrite"] + SMALL[:2] + ["--set", "data.builtin.train_per_task=7"]) == 0
    assert len(load_sft(run / "data", "helpful", "train")) == 7


def test_empty_split_is_one_error_and_nothing_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["data", "--run-dir", str(run), "--set", "data.builtin.dev_per_task=0"]) == 2
    err = capsys.readouterr().err
    assert "sft/helpful/dev: empty split" in err and err.count("error") == 1
    assert not (run / "data").exists()
    assert not list(run.glob(".data*")) if run.exists() else True


E2E = Path(__file__).parents[1] / "e2e"


def test_a_declared_fourth_dimension_flows_through_the_data(tmp_path, monkeypatch):
    """tests/e2e/four_dimensions.yaml: `concise` comes from the config, not from the package."""
    monkeypatch.syspath_prepend(str(E2E))
    run = tmp_path / "run"
    assert cli_main(["data", "--config", str(E2E / "four_dimensions.yaml"), "--run-dir", str(run)] + SMALL) == 0
    dims = ["helpful", "harmless", "honest", "concise"]
    assert data_dimensions(run / "data") == dims
    concise = load_sft(run / "data", "concise", "train")
    assert len(concise) == 20 and set(concise["task"]) == {"concise"}
    assert all(label == [0.0, 0.0, 0.0, 1.0] for label in concise["task_label"])
    assert load_sft(run / "data", "helpful", "train")[0]["task_label"] == [1.0, 0.0, 0.0, 0.0]
    concise_test = load_eval(run / "data", "concise", "test")
    assert set(concise_test["kind"]) == {"pair"}
    assert all(g.startswith("concise:") for g in concise_test["group"])
    mixed = load_mixed_sft(run / "data", "train", dict.fromkeys(dims, 1.0), seed=0)
    assert {t: mixed["task"].count(t) for t in dims} == dict.fromkeys(dims, 20)


def test_the_three_dimension_data_is_unchanged_by_a_fourth(tmp_path, monkeypatch):
    """Adding a dimension appends its rows; the others' rows (their RNG streams) are the same."""
    monkeypatch.syspath_prepend(str(E2E))
    assert cli_main(["data", "--run-dir", str(tmp_path / "three")] + SMALL) == 0
    assert cli_main(["data", "--config", str(E2E / "four_dimensions.yaml"),
                     "--run-dir", str(tmp_path / "four")] + SMALL) == 0
    for task in TASKS:
        a, b = (load_sft(tmp_path / r / "data", task, "train") for r in ("three", "four"))
        assert a["instruction"] == b["instruction"] and a["response"] == b["response"]


def test_old_data_dirs_name_their_dimensions_tasks(tmp_path):
    (tmp_path / "data_manifest.json").write_text(json.dumps({"tasks": ["helpful", "honest"]}))
    assert data_dimensions(tmp_path) == ["helpful", "honest"]

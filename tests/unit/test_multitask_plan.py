"""The multi-task baselines' plans without weights (pipeline.train.step_plan): the union's rows
per dimension, data_matched = one epoch of the union, compute_matched = every stage-1 run plus
fusion, the rows each trained model reads; the variant registry in config, stages and discovery.

A fake data dir with unequal row counts: helpful 40, harmless 24, honest 32 train rows. With
micro 4 x accum 1 x 2 ranks = 8 rows per step for both stages:
  stage 1 (3 epochs): 3 x 5, 3 x 3, 3 x 4 -> 15 + 9 + 12 = 36 steps;
  fusion mix (weights 1, 0.5, 2): 40 + 12 + 64 = 116 rows, 0.5 epoch = ceil(0.5 x 14) = 7 steps;
  union (a multiset): the 96 stage-1 rows, plus the mix's copies beyond them: honest x 2 adds
  each honest row once more -> 128 rows (helpful 40, harmless 24, honest 64);
  data_matched: floor(128 / 8) = 16 steps (one epoch whatever expert.train.epochs says);
  compute_matched: 36 + 7 = 43 steps (2 epochs of 16, then 11 steps of the next).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from pipeline.config import ConfigError, load_config
from pipeline.layout import RunLayout
from pipeline.registry import MULTITASK_VARIANTS
from pipeline.stages import pipeline_stages
from pipeline.train.step_plan import (plan_steps, rows_seen, seen_table, union_sft,
                                      variant_train)

ROWS = {"helpful": 40, "harmless": 24, "honest": 32}
SETS = ["expert.train.micro_batch_size=4", "expert.train.grad_accum_steps=1",
        "expert.train.epochs=3", "expert.num_procs=2", "fusion.train.micro_batch_size=4",
        "fusion.train.grad_accum_steps=1", "fusion.train.epochs=0.5", "fusion.num_procs=2",
        "fusion.mix_weights={helpful: 1.0, harmless: 0.5, honest: 2.0}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("plan") / "data"
    for i, (d, n) in enumerate(ROWS.items()):
        label = [float(j == i) for j in range(len(ROWS))]
        Dataset.from_dict({"instruction": [f"{d} {k}" for k in range(n)], "input": [""] * n,
                           "response": ["r"] * n, "task": [d] * n, "task_label": [label] * n}
                          ).save_to_disk(str(data / "sft" / d / "train"))
    (data / "data_manifest.json").write_text(json.dumps({"dimensions": list(ROWS)}))
    return data


def test_step_plan_matches_data_and_compute(data_dir):
    cfg = load_config("tiny", SETS)
    plan = plan_steps(cfg, data_dir)
    assert (plan.stage1, plan.fusion) == ({"helpful": 15, "harmless": 9, "honest": 12}, 7)
    assert plan.multitask == {"data_matched": 16, "compute_matched": 43}
    union = union_sft(data_dir, cfg.dimensions, cfg.fusion.mix_weights, cfg.fusion.train.seed)
    tasks = list(union["task"])
    assert len(tasks) == 128 and tasks[:40] == ["helpful"] * 40   # stage-1 rows first
    assert {d: tasks.count(d) for d in ROWS} == {"helpful": 40, "harmless": 24, "honest": 64}
    # data_matched ignores expert.train.epochs / max_steps; compute_matched fixes max_steps
    limited = load_config("tiny", SETS + ["expert.train.max_steps=5"]).expert.train
    assert variant_train("data_matched", limited, plan, "x").max_steps == -1
    assert variant_train("compute_matched", limited, plan, "x").max_steps == 43


def test_seen_table_counts_rows_per_dimension(data_dir):
    rows = {r["model"]: r for r in seen_table(load_config("tiny", SETS), data_dir)}
    assert list(rows) == ["helpful", "harmless", "honest", "fused", "multitask_data_matched",
                          "multitask_compute_matched", "more_helpful", "more_harmless",
                          "more_honest"]
    assert rows["helpful"]["seen_by_dimension"] == {"helpful": 15 * 8}   # 3 epochs of 40
    fused = rows["fused"]   # stage 1 (5 x 8 x 3, ...) + 7 fusion steps of 8 mixed rows
    assert (fused["steps_before"], fused["steps"]) == (36, 7)
    assert sum(fused["seen_by_dimension"].values()) == 36 * 8 + 7 * 8
    data = rows["multitask_data_matched"]
    assert data["rows_by_dimension"] == {"harmless": 24, "helpful": 40, "honest": 64}
    assert data["seen_by_dimension"] == data["rows_by_dimension"]   # 16 x 8 = every row once
    compute = rows["multitask_compute_matched"]["seen_by_dimension"]
    assert sum(compute.values()) == 43 * 8 and compute == rows_seen(
        ["helpful"] * 40 + ["harmless"] * 24 + ["honest"] * 64,
        load_config("tiny", SETS).expert.train, 2, 43)
    assert rows["more_honest"]["seen_by_dimension"] == {"honest": 12 * 8 + 7 * 8}


def test_one_stage_and_output_per_variant(tmp_path):
    run = RunLayout.at(tmp_path)
    names = [s.name for s in pipeline_stages(load_config("tiny"), run)]
    assert [n for n in names if n.startswith("baseline_multitask")] == \
        ["baseline_multitask_data_matched", "baseline_multitask_compute_matched"]
    one = load_config("tiny", ["baselines.multitask_variants=[compute_matched]"])
    stage = next(s for s in pipeline_stages(one, run) if s.name.startswith("baseline_multitask"))
    assert stage.argv == ("train-baseline", "--kind", "multitask", "--variant", "compute_matched")
    assert stage.outputs == (tmp_path / "baselines" / "multitask_compute_matched",)
    assert "baseline_multitask_compute_matched" in \
        next(s for s in pipeline_stages(one, run) if s.name == "evaluate").after
    off = load_config("tiny", ["baselines.multitask=false", "baselines.multitask_variants=[]"])
    assert not [s for s in pipeline_stages(off, run) if s.name.startswith("baseline_multitask")]


@pytest.mark.parametrize("value,message", [
    ("[data_matched, epoch_matched]", r"baselines\.multitask_variants\[1\]: unknown multi-task "
                                      r"baseline variant 'epoch_matched' \(known: data_matched, "
                                      r"compute_matched\)"),
    ("[]", r"baselines\.multitask is true but baselines\.multitask_variants is empty"),
    ("[compute_matched, compute_matched]", r"names a variant twice"),
])
def test_bad_multitask_variants_are_one_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"baselines.multitask_variants={value}"])


def test_bad_variant_on_the_command_line_fails_before_any_work(tmp_path, capsys):
    """An unknown --variant, or none with --kind multitask: exit 2, one error line, no output."""
    from pipeline.commands import main as cli_main

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:   # argparse's own exit for an invalid choice
        cli_main(["train-baseline", "--run-dir", str(run), "--variant", "epoch_matched"])
    assert stop.value.code == 2 and "invalid choice: 'epoch_matched'" in capsys.readouterr().err
    assert cli_main(["train-baseline", "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "h3fusion train-baseline: error: train-baseline multitask: --variant is required "
        "(variants: data_matched, compute_matched)"]
    assert not run.exists()
    assert list(MULTITASK_VARIANTS) == ["data_matched", "compute_matched"]
    for name in MULTITASK_VARIANTS:
        assert callable(MULTITASK_VARIANTS.get(name, "test"))


def test_rows_seen_tool_prints_the_table(data_dir, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "eval"))
    try:
        from rows_seen import main
    finally:
        sys.path.pop(0)
    assert main(["--data-dir", str(data_dir), *[x for s in SETS for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "| `multitask_data_matched` | the union" in out and "| 16 | 8 |" in out
    assert "| `fused` | the fusion mix (after stage 1) | 36 + 7 | 8 |" in out
    assert main(["--data-dir", str(data_dir / "missing")]) == 2
    assert "rows_seen: error:" in capsys.readouterr().err

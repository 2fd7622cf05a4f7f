"""End to end with a 4th alignment dimension declared outside the package (E = 4).

`h3fusion run` on tests/e2e/four_dimensions.yaml (the tiny preset + a synthetic "concise"
dimension, whose generator is tests/e2e/concise_dimension.py) cut down to a few training steps:
data -> tokenizer -> base -> 4 experts -> build_moe -> fuse -> merge -> evaluate -> profile, every
stage a subprocess that learns the new dimension from the config alone. Asserts the shapes (4
experts, a 4-expert fused model, 4 report dimensions, 4 profile columns), not the quality.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.layout import RunLayout

pytestmark = [pytest.mark.slow, pytest.mark.dist]

HERE = Path(__file__).parent
CONFIG = HERE / "four_dimensions.yaml"
TINY = HERE.parents[1] / "pipeline" / "presets" / "tiny.yaml"
DIMS = ["helpful", "harmless", "honest", "concise"]
FAST = [  # a few steps of everything: shapes, not quality
    "data.builtin.train_per_task=48", "data.builtin.dev_per_task=8", "data.builtin.test_per_task=8",
    "data.builtin.pretrain_per_task=60", "tokenizer.vocab_size=400",
    "base.tiny.num_hidden_layers=2", "base.train.max_steps=4",
    "expert.train.max_steps=2", "fusion.train.max_steps=2",
    "eval.max_items_per_task=4", "eval.generate=false", "profile.max_items_per_task=4",
    "merge.methods=[average]",
    # the training baselines are covered by tests/e2e/test_tiny_pipeline.py and tests/dist
    "baselines.multitask=false", "baselines.extra_steps=false",
]


def test_config_differs_from_tiny_only_by_the_dimension_lines():
    """docs/contracts.md shows this diff: adding a dimension = these keys + a data generator."""
    tiny, four = (yaml.safe_load(p.read_text()) for p in (TINY, CONFIG))
    assert four.pop("dimensions") == DIMS and set(four.pop("dimension_defs")) == {"concise"}
    assert four["fusion"]["gamma"].pop("concise") == 0.0
    assert four.pop("name") == "tiny-4d" and tiny.pop("name") == "tiny"
    assert four == tiny


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e4") / "run"
    cmd = [sys.executable, "-m", "pipeline.commands", "run", "--config", str(CONFIG), "--run-dir", str(out)]
    for item in FAST:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunLayout.at(out)


def test_four_experts_and_a_four_expert_fused_model(finished_run):
    run = finished_run
    data = json.loads((run.data / "data_manifest.json").read_text())
    assert data["dimensions"] == DIMS and data["row_counts"]["sft/concise/train"] == 48
    for dim in DIMS:
        assert (run.expert(dim) / "config.json").is_file(), dim
    for model in (run.fused_init, run.fused):
        cfg = json.loads((model / "config.json").read_text())
        assert cfg["num_experts"] == 4 and cfg["expert_names"] == DIMS


def test_report_and_profile_have_four_dimensions(finished_run):
    run = finished_run
    report = json.loads((run.eval / "report.json").read_text())
    assert list(report["score_metrics"]) == DIMS
    assert report["score_metrics"]["concise"] == "concise/pref_acc"
    assert [k for k in report["scores"]["fused"] if k != "mean"] == DIMS
    assert set(DIMS) <= set(report["models"])
    assert "## concise" in (run.eval / "report.md").read_text()
    profile = json.loads((run.profile / "expert_load.json").read_text())
    assert profile["expert_names"] == DIMS and set(DIMS) <= set(profile["tasks"])
    assert all(len(t["top1_share"]) == 4 for t in profile["tasks"].values())
    assert profile["tasks"]["concise"]["own_expert"] == 3
    with open(run.profile / "expert_load.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["expert_name"] for r in rows} == set(DIMS)

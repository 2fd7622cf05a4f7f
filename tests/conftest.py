"""Shared fixtures: a tiny finished run (data + tokenizer + base) and the real data slices.

`tiny_run` is session-scoped and built once at a SMALL size (60 train rows per task, vocab 512,
hidden 32, 2 layers, ~20 pre-training steps) so every test module can use real stage outputs.
Its signature (a `pipeline.layout.RunLayout` with data/tokenizer/base complete) is stable.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_RUN_OVERRIDES = [
    "data.builtin.train_per_task=60", "data.builtin.dev_per_task=12", "data.builtin.test_per_task=24",
    "data.builtin.pretrain_per_task=150",
    "tokenizer.vocab_size=512",
    "base.tiny.hidden_size=32", "base.tiny.intermediate_size=64", "base.tiny.num_hidden_layers=2",
    "base.tiny.num_attention_heads=2", "base.tiny.num_key_value_heads=2",
    "base.tiny.max_position_embeddings=128",
    "base.train.max_steps=20", "base.train.micro_batch_size=8", "base.train.max_seq_len=64",
    "base.train.warmup_steps=2", "base.train.log_every=0",
]


def tiny_config(extra: list[str] | None = None):
    """The tiny preset with the fixture's small sizes (plus `extra` --set style overrides)."""
    from pipeline.config import load_config
    return load_config("tiny", TINY_RUN_OVERRIDES + list(extra or []))


def build_tiny_run(root: Path, extra: list[str] | None = None):
    """Run the data, tokenizer and base stages into `root`; returns the RunLayout."""
    import torch
    from pipeline.train.base.stage import run_base_stage
    from pipeline.data.stage import run_data_stage
    from pipeline.layout import RunLayout
    from pipeline.tokenizer.stage import run_tokenizer_stage
    cfg = tiny_config(extra)
    torch.set_num_threads(1)
    run_data_stage(cfg, root)
    run_tokenizer_stage(cfg.tokenizer, root)
    run_base_stage(cfg.base, root, log=lambda *_: None)
    return RunLayout.at(root)


def load_tool(relpath: str):
    """Import a script under tools/ (not a package) as a module, e.g. "profiling/throughput.py"."""
    import importlib.util
    path = REPO_ROOT / "tools" / relpath
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """RunLayout of a tiny run with `data`, `tokenizer` and `base` finished (built once per session)."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real data slices (`<repo>/../shared/data`); fails (not skips) when absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"real data slices not found at {SHARED_DATA}: tests that read real data need "
                    f"the shared data dir (see docs/data.md); it is never copied into the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_data_paths(shared_data) -> dict:
    """`data.real` keys -> the shared slices: every dataset the real loaders need (no extras)."""
    d = shared_data
    return dict(alpaca=str(d / "alpaca/alpaca_small.json"), beavertails=str(d / "beavertails/beavertails_sample.csv"),
                truthfulqa=str(d / "truthfulqa/TruthfulQA.csv"), truthfulqa_mc=str(d / "truthfulqa/mc_task.json"),
                alpaca_eval=str(d / "alpaca_eval/alpaca_eval_text_davinci_003.json"),
                harmbench=str(d / "safety/harmbench/harmbench_prompts.txt"),
                donotanswer=str(d / "safety/donotanswer"), safety_pairs=str(d / "safety/response_pairs/objective"))

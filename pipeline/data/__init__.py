"""HHH datasets: built-in generator, real-dataset loaders, Alpaca template, loading and collation.

On-disk layout and column schema: docs/contracts.md ("Datasets on disk"); design: docs/data.md.
"""
from typing import Sequence

SFT_COLUMNS = ("instruction", "input", "response", "task", "task_label")
# `group`: the underlying question/prompt an eval row renders (rows of one group are phrasings of
# one question); splits are made by group, and intervals resample groups, never rendered text.
EVAL_COLUMNS = ("instruction", "input", "chosen", "rejected", "reference", "answer", "kind", "task",
                "group")
# harmful_prompt: a refusal is the right answer; benign_prompt: a refusal is over-refusal
EVAL_KINDS = ("mc", "pair", "harmful_prompt", "benign_prompt", "reference")
SFT_SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("dev", "test")


def one_hot(dimension: str, dimensions: Sequence[str]) -> list[float]:
    """The task label of a single-intent sample (soft vectors may spread mass over several):
    one weight per run dimension, in the config's `dimensions` order."""
    if dimension not in dimensions:
        raise ValueError(f"unknown dimension {dimension!r} (dimensions: {list(dimensions)})")
    return [1.0 if d == dimension else 0.0 for d in dimensions]

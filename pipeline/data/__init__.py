"""HHH datasets: built-in generator, real-dataset loaders, Alpaca template, loading and collation.

On-disk layout and column schema: docs/contracts.md ("Datasets on disk"); design: docs/data.md.
"""
from typing import Sequence

from .dimensions import EVAL_KINDS  # noqa: F401  (an eval row's kinds: defined with the dimensions)

SFT_COLUMNS = ("instruction", "input", "response", "task", "task_label")
# `group`: the underlying question/prompt an eval row renders (rows of one group are phrasings of
# one question); splits are made by group, and intervals resample groups, never rendered text.
EVAL_COLUMNS = ("instruction", "input", "chosen", "rejected", "reference", "answer", "kind", "task",
                "group")
SFT_SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("dev", "test")


# Routing labels (docs/data.md "Routing labels"): a row's `task` is the SFT set it sits in (whose
# expert trains on it); its `task_label` is the dimension whose expert should ANSWER its prompt.
# The two differ for benign instructions outside the helpful set (harmless_benign_rows, the
# built-in over-refusal probes): an ordinary request is the helpful expert's to answer.
BENIGN_ROUTE = "helpful"


def route_of(dimension: str, benign: bool, dimensions: Sequence[str]) -> str:
    """The routing dimension of a row of `dimension`'s set: BENIGN_ROUTE for a benign request
    when the run has that dimension, else its own set's dimension."""
    return BENIGN_ROUTE if benign and BENIGN_ROUTE in dimensions else dimension


def eval_route(item: dict, dimensions: Sequence[str]) -> str:
    """The routing dimension of an eval item: a `benign_prompt` (an ordinary request asked as an
    over-refusal check) is the helpful expert's; any other item is its own dimension's."""
    return route_of(item["task"], item["kind"] == "benign_prompt", dimensions)


def label_route(task_label: Sequence[float], dimensions: Sequence[str]) -> str:
    """The dimension a task label routes to: its largest weight (the first on a tie)."""
    if len(task_label) != len(dimensions):
        raise ValueError(f"task_label {list(task_label)} has {len(task_label)} weights for "
                         f"{len(dimensions)} dimensions {list(dimensions)}")
    return dimensions[max(range(len(task_label)), key=lambda i: (task_label[i], -i))]


def one_hot(dimension: str, dimensions: Sequence[str]) -> list[float]:
    """The task label of a single-intent sample (soft vectors may spread mass over several):
    one weight per run dimension, in the config's `dimensions` order."""
    if dimension not in dimensions:
        raise ValueError(f"unknown dimension {dimension!r} (dimensions: {list(dimensions)})")
    return [1.0 if d == dimension else 0.0 for d in dimensions]

"""HHH datasets: built-in generator, real-dataset loaders, Alpaca template, loading and collation.

On-disk layout and column schema: docs/contracts.md ("Datasets on disk"); design: docs/data.md.
"""
from ..config import TASKS

SFT_COLUMNS = ("instruction", "input", "response", "task", "task_label")
EVAL_COLUMNS = ("instruction", "input", "chosen", "rejected", "reference", "answer", "kind", "task")
EVAL_KINDS = ("mc", "pair", "harmful_prompt", "reference")
SFT_SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("dev", "test")


def one_hot(task: str) -> list[float]:
    """The task label of a single-intent sample (soft vectors may spread mass over several)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (tasks: {list(TASKS)})")
    return [1.0 if t == task else 0.0 for t in TASKS]

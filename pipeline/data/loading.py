"""Read the datasets `h3fusion data` wrote (`<run>/data`, layout in docs/contracts.md)."""
from __future__ import annotations

import math
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk

from ..io_utils import read_json
from . import EVAL_SPLITS, SFT_SPLITS

MANIFEST_NAME = "data_manifest.json"


def data_dimensions(data_dir: str | Path) -> list[str]:
    """The dimensions a finished data dir holds, in order (its manifest's list; data dirs written
    before the list was called `dimensions` name it `tasks`)."""
    manifest_file = Path(data_dir) / MANIFEST_NAME
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{data_dir} is not a finished data dir (no {MANIFEST_NAME}); "
                                f"run `h3fusion data` first")
    manifest = read_json(manifest_file)
    return list(manifest["dimensions"] if "dimensions" in manifest else manifest["tasks"])


def require_dimensions(data_dir: str | Path, dims: list[str], where: str) -> list[str]:
    """`dims` (a config's dimensions), which must be the data dir's, in order."""
    found = data_dimensions(data_dir)
    if found != list(dims):
        raise ValueError(f"{where}: {data_dir} holds dimensions {found}, the config {list(dims)}")
    return list(dims)


def _load_split(data_dir: str | Path, kind: str, task: str, split: str, splits: tuple) -> Dataset:
    dims = data_dimensions(data_dir)
    if task not in dims:
        raise ValueError(f"unknown dimension {task!r} (the data in {data_dir} has {dims})")
    if split not in splits:
        raise ValueError(f"unknown {kind} split {split!r} (splits: {list(splits)})")
    data_dir = Path(data_dir)
    path = data_dir / kind / task / split
    if not path.is_dir():
        raise FileNotFoundError(f"missing dataset split: {path}")
    return load_saved_split(path)


def load_saved_split(path: str | Path) -> Dataset:
    """`load_from_disk`, with a clear error for a dataset saved with 0 rows (datasets itself
    raises a bare IndexError on one) or a dir that holds no saved dataset."""
    state = Path(path) / "state.json"
    if not state.is_file():
        raise FileNotFoundError(f"{path} is not a saved dataset (no state.json; run `h3fusion data`)")
    if not read_json(state).get("_data_files"):
        raise ValueError(f"{path}: empty split (0 rows)")
    return load_from_disk(str(path))


def load_sft(data_dir: str | Path, task: str, split: str) -> Dataset:
    """Columns instruction, input, response, task, task_label."""
    return _load_split(data_dir, "sft", task, split, SFT_SPLITS)


def load_eval(data_dir: str | Path, task: str, split: str) -> Dataset:
    """Columns instruction, input, chosen, rejected, reference, answer, kind, task."""
    return _load_split(data_dir, "eval", task, split, EVAL_SPLITS)


def load_pretrain(data_dir: str | Path) -> Dataset:
    """Column text (the tokenizer's and the tiny base's corpus)."""
    data_dir = Path(data_dir)
    path = data_dir / "pretrain" / "train"
    if not (data_dir / MANIFEST_NAME).is_file() or not path.is_dir():
        raise FileNotFoundError(f"missing pretrain corpus {path} (run `h3fusion data` first)")
    return load_from_disk(str(path))


def load_mixed_sft(data_dir: str | Path, split: str, mix_weights: dict[str, float], seed: int) -> Dataset:
    """All dimensions' SFT rows of `split` (data dir order), mixed and shuffled with `seed`.

    A task with weight w contributes round(w * n_task) rows: w=1 all its rows, w=0.5 a seeded
    half, w=2 every row twice; w=0 (or absent) leaves the task out.
    """
    dims = data_dimensions(data_dir)
    unknown = [t for t in mix_weights if t not in dims]
    if unknown:
        raise ValueError(f"mix_weights: unknown dimensions {unknown} (the data in {data_dir} has {dims})")
    parts = []
    for i, task in enumerate(dims):
        w = float(mix_weights.get(task, 0.0))
        if w < 0 or math.isnan(w):
            raise ValueError(f"mix_weights[{task!r}] must be >= 0, got {w}")
        if w == 0:
            continue
        ds = load_sft(data_dir, task, split)
        n_rows = int(round(w * len(ds)))
        repeats, rest = divmod(n_rows, len(ds))
        chunks = [ds] * repeats
        if rest:
            chunks.append(ds.shuffle(seed=seed + i).select(range(rest)))
        parts.extend(chunks)
    if not parts:
        raise ValueError(f"mix_weights {mix_weights} select no rows")
    return concatenate_datasets(parts).shuffle(seed=seed)

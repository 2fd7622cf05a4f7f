"""The files of an evaluation: the eval items read from a data dir and the generations saved
per model. Apart from `stage` so that `reuse` can read and write them without importing the
stage that imports it."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .hhh import REQUIRED_COLUMNS, check_items


def load_eval_items(data_dir: Path, split: str, max_items: int) -> dict[str, list[dict]]:
    """dimension -> eval items (`max_items` first rows, 0 = all) via `pipeline.data.loading`, for
    every dimension of the data dir, in its order. A missing or empty eval set, or one that lacks
    a field, is one error naming the set and the field (raised before any model loads)."""
    from pipeline.data.loading import data_dimensions, load_eval

    items = {}
    for task in data_dimensions(data_dir):
        where = Path(data_dir) / "eval" / task / split
        if not where.is_dir():
            raise FileNotFoundError(f"eval set {where} is missing (run `h3fusion data` first)")
        ds = load_eval(data_dir, task, split)
        missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"eval set {where} lacks field(s) {missing} (an eval item has "
                             f"{list(REQUIRED_COLUMNS)})")
        if len(ds) == 0:
            raise ValueError(f"eval set {where} is empty: no items to evaluate")
        if max_items > 0:
            ds = ds.select(range(min(max_items, len(ds))))
        rows = ds.to_list()
        check_items(rows, str(where))
        items[task] = rows
    return items



def save_generations(out_dir: Path, name: str, records: list[dict]) -> Path:
    gen_dir = out_dir / "generations"
    gen_dir.mkdir(exist_ok=True)
    path = gen_dir / f"{name}.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    with open(gen_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["generator", "task", "kind", "instruction", "output"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path

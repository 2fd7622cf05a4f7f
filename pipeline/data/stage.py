"""`h3fusion data`: build the HHH datasets (built-in generator or real files) into `<run>/data`.

Everything is built and checked in memory first, then written into a temp dir that is renamed
onto `<run>/data` (`atomic_dir`), so a bad input never leaves a half-written data dir.
"""
from __future__ import annotations

import time
from pathlib import Path

from datasets import Dataset, Features, List, Value, disable_progress_bars

from ..config import DataConfig, PipelineConfig, to_dict
from ..io_utils import atomic_dir, write_json
from ..layout import RunLayout
from . import EVAL_COLUMNS, EVAL_KINDS, EVAL_SPLITS, SFT_COLUMNS, SFT_SPLITS, eval_route, label_route
from ..dimensions import resolve_dimensions
from .loading import MANIFEST_NAME
from .overlap import split_overlap

_STR = Value("string")
SFT_FEATURES = Features({"instruction": _STR, "input": _STR, "response": _STR, "task": _STR,
                         "task_label": List(Value("float32"))})
EVAL_FEATURES = Features({"instruction": _STR, "input": _STR, "chosen": List(_STR), "rejected": List(_STR),
                          "reference": _STR, "answer": _STR, "kind": _STR, "task": _STR,
                          "group": _STR})
PRETRAIN_FEATURES = Features({"text": _STR})


def _check_row(row: dict, columns: tuple, where: str, i: int) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ValueError(f"{where}: row {i} lacks columns {missing}")
    for c in columns:
        v = row[c]
        if c in ("chosen", "rejected", "task_label"):
            if not isinstance(v, list):
                raise ValueError(f"{where}: row {i} column {c!r} must be a list, got {type(v).__name__}")
        elif not isinstance(v, str):
            raise ValueError(f"{where}: row {i} column {c!r} must be a string, got {type(v).__name__}")


def check_sft_rows(rows: list[dict], where: str, width: int) -> None:
    if not rows:
        raise ValueError(f"{where}: empty split (no rows)")
    for i, row in enumerate(rows):
        _check_row(row, SFT_COLUMNS, where, i)
        if not row["instruction"].strip() or not row["response"].strip():
            raise ValueError(f"{where}: row {i} has an empty instruction or response")
        if len(row["task_label"]) != width or sum(row["task_label"]) <= 0:
            raise ValueError(f"{where}: row {i} task_label must have {width} weights (one per "
                             f"dimension), sum > 0")


def check_eval_rows(rows: list[dict], where: str) -> None:
    if not rows:
        raise ValueError(f"{where}: empty split (no rows)")
    for i, row in enumerate(rows):
        _check_row(row, EVAL_COLUMNS, where, i)
        if not row["chosen"]:
            raise ValueError(f"{where}: row {i} has no chosen answer")
        if row["kind"] not in EVAL_KINDS:
            raise ValueError(f"{where}: row {i} kind {row['kind']!r} not in {list(EVAL_KINDS)}")


def build_corpus(cfg: DataConfig, dims: list) -> tuple[dict, dict, list[str], dict]:
    """-> (sft[dim][split], eval[dim][split], pretrain texts, sources) for the configured source
    and the run's dimensions (`dimensions.Dimension`s, in order)."""
    if cfg.source == "builtin":
        from .builtin import STRIP, build_builtin
        sft, evals, pretrain = build_builtin(cfg.builtin, dims)
        sources = {"kind": "builtin", "generator": "pipeline.data.builtin", "config": to_dict(cfg.builtin)}
        strip = STRIP
    elif cfg.source == "real":
        from .real import build_real
        sft, evals, pretrain, sources = build_real(cfg.real, dims)
        strip = ()
    else:
        raise ValueError(f"data.source must be builtin|real, got {cfg.source!r}")
    for task in (d.name for d in dims):
        for split in SFT_SPLITS:
            check_sft_rows(sft.get(task, {}).get(split, []), f"sft/{task}/{split}", len(dims))
        for split in EVAL_SPLITS:
            check_eval_rows(evals.get(task, {}).get(split, []), f"eval/{task}/{split}")
    if not pretrain or not any(t.strip() for t in pretrain):
        raise ValueError("pretrain/train: empty corpus")
    for task in (d.name for d in dims):
        check_no_leak(sft[task]["train"], evals[task], task, strip)
    return sft, evals, pretrain, sources


def check_no_leak(train: list[dict], evals: dict, task: str, strip=()) -> None:
    """Refuse a corpus whose eval dev/test rows ask a training question or reward a training
    response (normalised; `strip`: the built-in shared lead-ins/endings). Pre-training text is
    not checked: it is the base's world knowledge, shared by every model (docs/data.md)."""
    for split in EVAL_SPLITS:
        hits = split_overlap(train, evals[split], strip=strip)
        if hits["questions"] or hits["targets"]:
            raise ValueError(
                f"data leak: eval/{task}/{split} shares {len(hits['questions'])} question(s) and "
                f"{len(hits['targets'])} target(s) with sft/{task}/train (normalised), e.g. questions "
                f"{hits['questions'][:3]}, targets {hits['targets'][:3]}; split by underlying "
                f"question (group)")


def write_data_dir(out: Path, sft: dict, evals: dict, pretrain: list[str], sources: dict,
                   overwrite: bool = False) -> dict:
    """`sft`/`evals` keys (in order) are the run's dimensions; the manifest lists them."""
    """Save every split (Arrow) and `data_manifest.json` (written last) atomically into `out`."""
    disable_progress_bars()
    counts: dict[str, int] = {}
    dims = list(sft)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for task in sft:
            for split in SFT_SPLITS:
                rows = [{c: r[c] for c in SFT_COLUMNS} for r in sft[task][split]]
                Dataset.from_list(rows, features=SFT_FEATURES).save_to_disk(str(tmp / "sft" / task / split))
                counts[f"sft/{task}/{split}"] = len(rows)
            for split in EVAL_SPLITS:
                rows = [{c: r[c] for c in EVAL_COLUMNS} for r in evals[task][split]]
                Dataset.from_list(rows, features=EVAL_FEATURES).save_to_disk(str(tmp / "eval" / task / split))
                counts[f"eval/{task}/{split}"] = len(rows)
        Dataset.from_dict({"text": list(pretrain)}, features=PRETRAIN_FEATURES).save_to_disk(
            str(tmp / "pretrain" / "train"))
        counts["pretrain/train"] = len(pretrain)
        manifest = {"stage": "data", "source": sources, "row_counts": counts, "dimensions": dims,
                    "routing_counts": routing_counts(sft, evals, dims), "created_unix": time.time()}
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def routing_counts(sft: dict, evals: dict, dims: list[str]) -> dict[str, dict[str, int]]:
    """Rows of every set and split by routing label (docs/data.md "Routing labels"): SFT rows by
    their task_label, eval items by `eval_route` (benign_prompt -> helpful)."""
    out: dict[str, dict[str, int]] = {}
    for task in dims:
        for split in SFT_SPLITS:
            routes = [label_route(r["task_label"], dims) for r in sft[task][split]]
            out[f"sft/{task}/{split}"] = {d: routes.count(d) for d in dims if d in routes}
        for split in EVAL_SPLITS:
            routes = [eval_route(r, dims) for r in evals[task][split]]
            out[f"eval/{task}/{split}"] = {d: routes.count(d) for d in dims if d in routes}
    return out


def run_data_stage(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False) -> dict:
    """The whole config: the data section and the run's `dimensions` (+ `dimension_defs`)."""
    dims = resolve_dimensions(cfg.dimensions, cfg.dimension_defs)
    sft, evals, pretrain, sources = build_corpus(cfg.data, dims)
    return write_data_dir(RunLayout.at(run_dir).data, sft, evals, pretrain, sources, overwrite)

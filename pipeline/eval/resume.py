"""Finished models of an interrupted `evaluate`, kept for its rerun.

Evaluating one model takes minutes to half an hour on a CPU, and a run's evaluation holds a
dozen models; a crash or kill near the end should not cost the ones already done. As soon as a
model finishes, its metrics and generations go to `<out>.results/<name>.json` (beside the report
dir `<out>`) under a fingerprint of everything that decides them: the model dir's files (name,
size, mtime) and, for an ensemble, its members' dirs; the tokenizer dir; the eval items; the
evaluation settings that decide the model's own results, with its prompt format when not Alpaca
(reuse.with_prompt_format; report-level ones such as n_boot or
eval.reuse_from may change between the runs: pipeline.eval.reuse.per_model_settings). A rerun reuses an entry only when its fingerprint matches, so a retrained
model, other items or another setting are evaluated again. The folder is removed once the report
is written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional


def _dir_files(path: Path) -> list[list]:
    """(name, size, mtime_ns) of every file under `path`: a rewritten weight file changes them."""
    path = Path(path).resolve()
    return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(path.rglob("*")) if f.is_file()]


def model_files(path: Path) -> dict[str, list]:
    """Model dir -> its files, with an ensemble's member dirs (its config names them) included."""
    path = Path(path).resolve()
    out = {str(path): _dir_files(path)}
    config = json.loads((path / "config.json").read_text())
    for member in config.get("members") or []:
        member_path = Path(member) if Path(member).is_absolute() else path / member
        out.update(model_files(member_path))
    return out


def fingerprint(model_dir: Path, tokenizer_dir: Optional[Path], items: dict[str, list[dict]],
                settings: dict[str, Any]) -> str:
    blob = {"model": model_files(model_dir),
            "tokenizer": _dir_files(tokenizer_dir) if tokenizer_dir else None,
            "items": items, "settings": settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


class ResultCache:
    """One JSON file per finished model: {"fingerprint", "metrics", "outputs", "cost"}."""

    def __init__(self, out_dir: Path):
        out_dir = Path(out_dir)
        self.dir = out_dir.parent / f".{out_dir.name}.results"

    def get(self, name: str, key: str) -> Optional[tuple[dict, dict, Optional[dict]]]:
        path = self.dir / f"{name}.json"
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError:   # cannot happen through put() (rename); a hand-edited file
            return None
        if entry.get("fingerprint") != key:
            return None
        return entry["metrics"], entry["outputs"], entry.get("cost")

    def put(self, name: str, key: str, metrics: dict, outputs: dict,
            cost: Optional[dict] = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": key, "metrics": metrics, "outputs": outputs,
                                   "cost": cost}))
        tmp.replace(path)   # a kill mid-write leaves the old entry or none, never half of one

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

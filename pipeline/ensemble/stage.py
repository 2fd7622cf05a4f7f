"""`h3fusion ensemble`: build the run's LLM-ensemble baselines from its experts, one dir per
method, `<run>/ensembles/<method>`:

- `avg`:    probability averaging over the experts (pipeline.ensemble.avg)
- `router`: one expert per prompt, chosen by a prompt classifier trained here on the fusion
  training rows (pipeline.ensemble.router)
- `oracle`: each eval prompt to its own dimension's expert (pipeline.ensemble.oracle).

The methods are `pipeline.registry.ENSEMBLES` (pipeline.ensemble.method): each one's `build` hook
writes its own files and returns its manifest entries.

Each dir is written atomically (pipeline.io_utils.atomic_dir) and holds config.json (members by
path relative to the dir), the tokenizer and `ensemble_manifest.json` (written last).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..io_utils import atomic_dir, is_complete, read_json, sha256_dir, write_json
from ..layout import RunLayout
from ..registry import ENSEMBLES
from .classifier import PROMPT_WINDOW
from .method import EnsembleBuild
from .modeling import EnsembleConfig

MANIFEST = "ensemble_manifest.json"


def check_members(experts: dict[str, Path]) -> int:
    """The members' shared vocab size; one error naming every missing dir or a vocab mismatch."""
    missing = [f"{name}: {path}" for name, path in experts.items() if not (path / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"ensemble: expert model dir(s) missing (no config.json): {missing}")
    sizes = {name: read_json(path / "config.json").get("vocab_size") for name, path in experts.items()}
    if len(set(sizes.values())) != 1 or not isinstance(next(iter(sizes.values())), int):
        raise ValueError(f"ensemble: experts must share one vocab_size, got {sizes}")
    return next(iter(sizes.values()))


def build_run_ensembles(cfg, run_dir: str | Path, methods: Optional[Sequence[str]] = None,
                        overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Build `methods` (default: every registered one; until the config has an `ensemble:`
    section, docs/baselines.md) under `<run>/ensembles/`; a finished one is kept unless
    `overwrite`. `cfg` is the whole PipelineConfig. Returns {method: dir}."""
    from ..checkpoint.safetensors_io import copy_tokenizer_files
    from ..checkpoint.tokenizer_check import has_tokenizer

    run = RunLayout.at(run_dir)
    methods = list(methods or ENSEMBLES.names())
    builders = {m: ENSEMBLES.get(m, "ensemble --methods") for m in methods}
    experts = {dim: run.expert(dim) for dim in cfg.dimensions}
    vocab = check_members(experts)
    tokenizer_dir = run.base if has_tokenizer(run.base) else run.tokenizer
    if not has_tokenizer(tokenizer_dir):
        raise FileNotFoundError(f"ensemble: no tokenizer in {run.base} or {run.tokenizer}")
    sources = None   # hashed once, only when something is built
    done: dict[str, Path] = {}
    for method in methods:
        out = run.ensemble(method)
        done[method] = out
        if is_complete(out, MANIFEST) and not overwrite:
            log(f"h3fusion ensemble: {method}: {out} is complete, skipping (--overwrite to redo)")
            continue
        sources = sources or {name: {"path": str(p.resolve()), "sha256": sha256_dir(p)}
                              for name, p in experts.items()}
        with atomic_dir(out, overwrite=overwrite or out.exists()) as tmp:
            info = builders[method].build(EnsembleBuild(cfg, run, tmp, tokenizer_dir, vocab))
            _write_config(tmp, out, method, experts, vocab, tokenizer_dir, info.pop("marker", None))
            copy_tokenizer_files(tokenizer_dir, tmp)
            write_json(tmp / MANIFEST, {"method": method, "members": sources, "vocab_size": vocab,
                                        "tokenizer": str(tokenizer_dir.resolve()), **info})
        log(f"h3fusion ensemble: {method} -> {out}")
    return done


def _write_config(tmp: Path, out: Path, method: str, experts: dict[str, Path], vocab: int,
                  tokenizer_dir: Path, marker: Optional[list[int]]) -> None:
    """config.json; member paths relative to the FINAL dir (the temp dir sits beside it, at the
    same depth, so they resolve from both)."""
    first = read_json(next(iter(experts.values())) / "config.json")
    config = EnsembleConfig(
        method=method, members=[os.path.relpath(p.resolve(), out.parent.resolve() / out.name)
                                for p in experts.values()],
        member_names=list(experts), response_marker_ids=marker, prompt_window=PROMPT_WINDOW,
        vocab_size=vocab,
        bos_token_id=first.get("bos_token_id"), eos_token_id=first.get("eos_token_id"),
        pad_token_id=first.get("pad_token_id"))
    config.check_ensemble(f"ensemble {method}")
    config.save_pretrained(tmp)


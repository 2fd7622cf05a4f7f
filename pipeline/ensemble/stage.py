"""`h3fusion ensemble`: build the run's LLM-ensemble baselines from its experts.

- `<run>/ensembles/avg`:    probability averaging over the experts (pipeline.ensemble.modeling)
- `<run>/ensembles/router`: one expert per prompt, chosen by a prompt classifier trained here on
  the fusion training rows (`fusion.mix_weights`, `fusion.train.seed`: the rows fusion trains on)
  with label = the row's routing label (its task_label: docs/data.md "Routing labels"); its
  accuracy on every dimension's SFT dev split (held out: nothing was tuned on it) goes into the
  manifest with a bootstrap interval.
- `<run>/ensembles/oracle`: each eval prompt to its own dimension's expert (pipeline.ensemble.oracle).

The methods and their builders are `pipeline.registry.ENSEMBLES`.

Each dir is written atomically (pipeline.io_utils.atomic_dir) and holds config.json (members by
path relative to the dir), the tokenizer and `ensemble_manifest.json` (written last).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..io_utils import atomic_dir, is_complete, read_json, sha256_dir, sha256_file, write_json
from ..layout import RunLayout
from ..registry import ENSEMBLES
from .classifier import (L2, PROMPT_WINDOW, PromptClassifier, prompt_tokens,
                         response_marker_ids, train_classifier)
from .modeling import CLASSIFIER_FILE, ENSEMBLE_METHODS, EnsembleConfig

MANIFEST = "ensemble_manifest.json"
# until the config has an `ensemble:` section (docs/baselines.md), every method is built
DEFAULT_METHODS = ENSEMBLE_METHODS


@dataclasses.dataclass(frozen=True)
class EnsembleBuild:
    """What a method's builder (pipeline.registry.ENSEMBLES) gets: the whole PipelineConfig, the
    run, the temp dir it writes its files into, the tokenizer dir and the members' vocab size."""
    cfg: Any
    run: RunLayout
    tmp: Path
    tokenizer_dir: Path
    vocab: int


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
    """Build `methods` (default both) under `<run>/ensembles/`; a finished one is kept unless
    `overwrite`. `cfg` is the whole PipelineConfig. Returns {method: dir}."""
    from ..checkpoint.safetensors_io import copy_tokenizer_files
    from ..checkpoint.tokenizer_check import has_tokenizer

    run = RunLayout.at(run_dir)
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        ENSEMBLES.check(m, "ensemble --methods")
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
            info = ENSEMBLES.get(method, "ensemble")(EnsembleBuild(cfg, run, tmp, tokenizer_dir, vocab))
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


def build_avg(build: EnsembleBuild) -> dict:
    """Probability averaging: nothing beyond the config."""
    return {}


def build_router(build: EnsembleBuild) -> dict:
    """Train the prompt classifier, save it, and return its manifest entries (+ the marker)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ..data.loading import load_mixed_sft, require_dimensions

    cfg, run, tmp, vocab = build.cfg, build.run, build.tmp, build.vocab
    tokenizer = AutoTokenizer.from_pretrained(str(build.tokenizer_dir))
    marker = response_marker_ids(tokenizer)
    dims = require_dimensions(run.data, cfg.dimensions, "ensemble")
    max_len = cfg.fusion.train.max_seq_len
    train = load_mixed_sft(run.data, "train", cfg.fusion.mix_weights, cfg.fusion.train.seed)
    prompts, labels = encode_rows(tokenizer, train, marker, dims, max_len, "train")
    clf = train_classifier(prompts, labels, len(dims), vocab)
    save_file(clf.state_dict(), str(tmp / CLASSIFIER_FILE))
    return {"marker": marker, "classifier": {
        "features": "L2-normalised token-id counts of the prompt's last prompt_window tokens "
                    "(up to the response marker)", "prompt_window": PROMPT_WINDOW,
        "model": "multinomial logistic regression, L-BFGS, float64", "l2": L2,
        "train": {"split": "train", "rows": len(labels), "mix_weights": dict(cfg.fusion.mix_weights),
                  "seed": cfg.fusion.train.seed, "max_len": max_len,
                  "label": "routing label (largest task_label weight)",
                  "rows_by_label": {d: labels.count(i) for i, d in enumerate(dims)}},
        "response_marker_ids": marker, "classes": dims,
        "dev_accuracy": dev_accuracy(clf, tokenizer, run.data, dims, marker, max_len),
        "data_manifest_sha256": sha256_file(run.data / "data_manifest.json")}}


def encode_rows(tokenizer, rows, marker: list[int], dims: list[str], max_len: int, where: str):
    """(classifier prompt tokens, routing dimension index) per SFT row, tokenized as the
    evaluation tokenizes a prompt (bos + Alpaca prompt, left-truncated to max_len). The label is
    the row's routing label: the largest weight of its task_label (`pipeline.data.label_route`)."""
    from ..data import label_route
    from ..data.template import encode_prompt_response, format_prompt

    prompts, labels = [], []
    for i, row in enumerate(rows):
        try:
            route = label_route(row["task_label"], dims)
        except ValueError as exc:
            raise ValueError(f"ensemble: {where} row {i}: {exc}") from None
        ids = encode_prompt_response(tokenizer, format_prompt(row["instruction"], row.get("input") or ""),
                                     None, max_len)[0]
        prompts.append(prompt_tokens(ids, marker, PROMPT_WINDOW))
        labels.append(dims.index(route))
    return prompts, labels


def dev_accuracy(clf: PromptClassifier, tokenizer, data_dir: Path, dims: list[str],
                 marker: list[int], max_len: int) -> dict:
    """Accuracy on each dimension's SFT dev rows and over all of them, with bootstrap intervals."""
    from ..data.loading import load_sft
    from ..eval.bootstrap import mean_interval

    out, every = {}, []
    for dim in dims:
        prompts, labels = encode_rows(tokenizer, load_sft(data_dir, dim, "dev"), marker, dims,
                                      max_len, f"{dim} dev")
        hits = [float(p == y) for p, y in zip(clf.predict(prompts), labels)]
        every += hits
        out[dim] = dataclasses.asdict(mean_interval(hits))
    out["all"] = dataclasses.asdict(mean_interval(every))
    return out

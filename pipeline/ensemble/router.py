"""Ensemble method "router" (pipeline.registry.ENSEMBLES): each sequence is run by ONE member,
chosen from its prompt by a prompt classifier (pipeline.ensemble.classifier); the ensemble's
`logits` are that member's logits.

The classifier is trained by `h3fusion ensemble` on the fusion training rows (`fusion.mix_weights`,
`fusion.train.seed`: the rows fusion trains on) with label = the row's routing label (its
task_label: docs/data.md "Routing labels"); its accuracy on every dimension's SFT dev split (held
out: nothing was tuned on it) goes into the manifest with a bootstrap interval. It is saved in the
ensemble dir as `router_classifier.safetensors`; the evaluation reports its choice per eval item
(pipeline.eval.routing).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from ..io_utils import sha256_file
from .classifier import (L2, PROMPT_WINDOW, PromptClassifier, item_prompt_window, prompt_tokens,
                         response_marker_ids, train_classifier)
from .method import EnsembleBuild, RoutingMethod

CLASSIFIER_FILE = "router_classifier.safetensors"


def load_classifier(root: Path) -> PromptClassifier:
    from safetensors.torch import load_file
    path = Path(root) / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"router ensemble without its classifier: {path}")
    state = load_file(str(path))
    return PromptClassifier(state["weight"], state["bias"])


class Router(RoutingMethod):
    reports_routing = True

    def build(self, build: EnsembleBuild) -> dict:
        return build_router(build)

    def load(self, root: Path, config) -> PromptClassifier:
        return load_classifier(root)

    def attach(self, model, state: PromptClassifier | None) -> None:
        n = len(model.members)
        if not isinstance(state, PromptClassifier) or state.num_classes != n:
            raise ValueError(f"router ensemble: a classifier over {n} members is needed")
        # buffers: they follow the model to its device
        model.register_buffer("router_weight", state.weight.clone(), persistent=False)
        model.register_buffer("router_bias", state.bias.clone(), persistent=False)

    def choose(self, model, windows: Sequence[Sequence[int]]) -> list[int]:
        return PromptClassifier(model.router_weight.cpu(), model.router_bias.cpu()).predict(windows)

    def route_items(self, root: Path, tokenizer, items: Sequence[dict]) -> list[int]:
        from .modeling import EnsembleConfig

        config = EnsembleConfig.from_pretrained(root)
        marker = list(config.response_marker_ids)
        windows = [item_prompt_window(tokenizer, marker, it, config.prompt_window) for it in items]
        return load_classifier(root).predict(windows)


ROUTER = Router()


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

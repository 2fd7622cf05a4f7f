"""`h3fusion evaluate`: HHH metrics for several models -> report.md, report.json, scores.png.

For every model: log-likelihood metrics (MC1/MC2, preference accuracy, reference log-lik) and
generation metrics (refusal rate, exact match) per task, generations saved in AlpacaEval format
(JSON + CSV) for external judges, optional judges behind flags. `evaluate_models` is the Python
entry point the whole-pipeline runner calls.
"""
from __future__ import annotations

import csv
import gc
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import EvalConfig
from pipeline.io_utils import atomic_dir, write_json

from . import judges
from .hhh import REQUIRED_COLUMNS, check_items, evaluate_task, format_prompt
from .models import load_causal_lm
from .report import choose_score_metrics, dimension_scores, fused_gains, plot_scores, render_markdown
from .scoring import GenerationConfig

FUSED = "fused"


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


def check_model_dirs(models: dict[str, Path]) -> None:
    """Every model dir holds a config.json: checked for all before the first (slow) model load."""
    bad = {name: str(path) for name, path in models.items() if not (Path(path) / "config.json").is_file()}
    if bad:
        raise FileNotFoundError(f"not Hugging Face model directories (no config.json): {bad}")


def _generation_config(cfg: EvalConfig) -> Optional[GenerationConfig]:
    if not cfg.generate:
        return None
    return GenerationConfig(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p)


def scored_max_len(model, cfg: EvalConfig) -> int:
    positions = getattr(model.config, "max_position_embeddings", None) or cfg.max_seq_len
    return min(cfg.max_seq_len, positions)


def _generation_records(name: str, items: dict[str, list[dict]], outputs: dict[str, list[str]]) -> list[dict]:
    """AlpacaEval rows (`instruction`, `output`, `generator`) plus our task/kind for filtering."""
    records = []
    for task, task_outputs in outputs.items():
        for item, out in zip(items[task], task_outputs):
            instruction = item["instruction"] + (f"\n\n{item['input']}" if item["input"] else "")
            records.append({"instruction": instruction, "output": out, "generator": name,
                            "dataset": task, "task": task, "kind": item["kind"]})
    return records


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


def _moderate(metrics: dict, items: dict[str, list[dict]], outputs: dict[str, list[str]],
              moderation_model: Path, batch_size: int) -> None:
    """flagged_rate of the judge over the model's responses to the harmless task's prompts."""
    if "harmless" not in items:
        raise ValueError(f"--moderation-model judges the harmless dimension's generations; this "
                         f"run's dimensions are {list(items)}")
    prompts = [format_prompt(it["instruction"], it["input"]) for it in items["harmless"]]
    metrics["harmless"]["flagged_rate"] = judges.moderation_flagged_rate(
        moderation_model, prompts, outputs["harmless"], batch_size)


def evaluate_one_model(name: str, path: Path, items: dict[str, list[dict]], cfg: EvalConfig,
                       tokenizer_dir: Optional[Path]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """task -> metrics, and task -> generations, for one model."""
    model, tokenizer = load_causal_lm(path, tokenizer_dir)
    gen = _generation_config(cfg)
    metrics, outputs = {}, {}
    try:
        for task in items:
            torch.manual_seed(cfg.seed)  # sampled generations repeat across reruns
            metrics[task], task_outputs = evaluate_task(
                model, tokenizer, items[task], batch_size=cfg.batch_size,
                max_len=scored_max_len(model, cfg), gen=gen, task=f"{name}/{task}")
            if gen is not None:
                outputs[task] = task_outputs
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return metrics, outputs


def _judge(name, metrics, items, outputs, out_dir, cfg, moderation_model, alpaca_eval) -> dict:
    """Run the optional judges on one model's generations; returns AlpacaEval's status."""
    records = _generation_records(name, items, outputs)
    save_generations(out_dir, name, records)
    if moderation_model is not None:
        _moderate(metrics, items, outputs, moderation_model, cfg.batch_size)
    if not alpaca_eval:
        return {}
    helpful = out_dir / "generations" / f"{name}.helpful.alpaca_eval.json"
    helpful.write_text(json.dumps([r for r in records if r["task"] == "helpful"], indent=2) + "\n")
    return judges.run_alpaca_eval(helpful, out_dir / "alpaca_eval" / name)


def build_report(metrics: dict[str, dict], models: dict[str, Path], cfg: EvalConfig,
                 dimensions: list[str]) -> dict[str, Any]:
    chosen = choose_score_metrics(metrics, dimensions)
    scores = dimension_scores(metrics, chosen)
    return {"split": cfg.split, "models": {m: str(p) for m, p in models.items()},
            "metrics": metrics, "score_metrics": chosen, "scores": scores,
            "fused_model": FUSED, "tolerance": cfg.tolerance,
            "fused_gain": fused_gains(scores, FUSED, cfg.tolerance)}


def evaluate_models(models: dict[str, Path], data_dir: Path, cfg: EvalConfig, out_dir: Path, *,
                    tokenizer_dir: Optional[Path] = None, moderation_model: Optional[Path] = None,
                    alpaca_eval: bool = False, overwrite: bool = False) -> dict:
    """Evaluate `models` (name -> HF dir) on `data_dir`'s eval items; write the report to
    `out_dir` atomically and return the report dict."""
    if not models:
        raise ValueError("evaluate: no models given")
    if (moderation_model is not None or alpaca_eval) and not cfg.generate:
        raise ValueError("--moderation-model and --alpaca-eval judge generations: "
                         "they need eval.generate=true")
    items = load_eval_items(Path(data_dir), cfg.split, cfg.max_items_per_task)
    check_model_dirs(models)
    t0 = time.time()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        metrics, alpaca = {}, {}
        for name, path in models.items():
            print(f"evaluating {name} ({path})", flush=True)
            metrics[name], outputs = evaluate_one_model(name, Path(path), items, cfg, tokenizer_dir)
            if outputs:
                alpaca[name] = _judge(name, metrics[name], items, outputs, tmp, cfg,
                                      moderation_model, alpaca_eval)
        report = build_report(metrics, models, cfg, list(items))
        report.update(alpaca_eval=alpaca, config=vars(cfg).copy(), data_dir=str(data_dir),
                      wall_time_s=round(time.time() - t0, 2))
        # not io_utils.write_json: it sorts keys, and the models' order is the report's order
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        plot_scores(report["scores"], tmp / "scores.png")
        write_json(tmp / "manifest.json", {"stage": "evaluate", "models": report["models"],
                                           "files": ["report.json", "report.md", "scores.png"]})
    return report

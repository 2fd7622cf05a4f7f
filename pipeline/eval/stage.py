"""`h3fusion evaluate`: HHH metrics for several models -> report.md, report.json, scores.png.

For every model: log-likelihood metrics (MC1/MC2, preference accuracy, reference log-lik) and
generation metrics (refusal rate, exact match) per task, generations saved in AlpacaEval format
(JSON + CSV) for external judges, optional judges turned on by kind (pipeline.eval.judging,
registry pipeline.registry.JUDGES). `evaluate_models` is the Python
entry point the whole-pipeline runner calls; a rerun after a crash reuses the models that had
finished (pipeline.eval.resume).
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import EvalConfig
from pipeline.io_utils import atomic_dir, write_json

from . import judging
from .cost import CostMeter, reused_cost
from .generation import GenerationConfig
from .files import load_eval_items, save_generations
from .hhh import evaluate_task
from .judge_report import generation_judge_report, refusal_judge_report
from .models import check_prompt_formats, load_causal_lm, resolve_eval_precision
from .prompts import ALPACA
from .report import item_layout, plot_scores, render_markdown, score_report
from .resume import ResultCache, fingerprint
from .routing import check_oracle_tables, check_routed_formats, routing_confusion
from .reuse import (EarlierResults, code_fingerprint, per_model_settings, result_key,
                    with_prompt_format)
from .score_metrics import check_score_overrides

FUSED = "fused"


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
            if out is None:            # not generated (no metric reads it)
                continue
            instruction = item["instruction"] + (f"\n\n{item['input']}" if item["input"] else "")
            records.append({"instruction": instruction, "output": out, "generator": name,
                            "dataset": task, "task": task, "kind": item["kind"]})
    return records


def evaluate_one_model(name: str, path: Path, items: dict[str, list[dict]], cfg: EvalConfig,
                       tokenizer_dir: Optional[Path], generate_all: bool = False,
                       meter: Optional[CostMeter] = None, prompt_format: str = ALPACA
                       ) -> tuple[dict[str, dict], dict[str, list[Optional[str]]]]:
    """task -> metrics, and task -> generations (None: not generated), for one model; `meter`
    gets its parameter/FLOP counts and the timed tokens of its scoring and generation calls;
    `prompt_format`: pipeline.eval.prompts."""
    model, tokenizer = load_causal_lm(path, tokenizer_dir, precision=cfg.precision)
    if meter is not None:
        meter.describe(model, scored_max_len(model, cfg))
    gen = _generation_config(cfg)
    metrics, outputs, memo = {}, {}, {}   # memo: each distinct prompt generated once (greedy)
    try:
        for task in items:
            torch.manual_seed(cfg.seed)  # sampled generations repeat across reruns
            metrics[task], task_outputs = evaluate_task(
                model, tokenizer, items[task], batch_size=cfg.batch_size,
                max_len=scored_max_len(model, cfg), gen=gen, task=f"{name}/{task}",
                generate_all=generate_all, harness_mc=cfg.harness_mc, meter=meter,
                prompt_format=prompt_format, generation_memo=memo)
            if gen is not None:
                outputs[task] = task_outputs
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return metrics, outputs


def _judge(name, metrics, items, outputs, out_dir, cfg, judges_on) -> dict[str, dict]:
    """Save one model's generations and run the judges turned on (`judges_on`: kind -> setting)
    on them; returns report key -> the model's status (pipeline.eval.judging.run_judges)."""
    records = _generation_records(name, items, outputs)
    save_generations(out_dir, name, records)
    return judging.run_judges(judges_on, name, items, outputs, records, metrics, out_dir,
                              cfg.batch_size)


def check_eval_config(cfg: EvalConfig, dimensions: list[str]) -> None:
    """Report settings that would fail only after every model ran."""
    if cfg.n_boot < 1:
        raise ValueError(f"eval.n_boot must be >= 1, got {cfg.n_boot}")
    check_score_overrides(cfg.score_metrics, dimensions, "eval.score_metrics")


def build_report(metrics: dict[str, dict], models: dict[str, Path], cfg: EvalConfig,
                 layout: dict[str, dict], refusal_judge: dict[str, Any]) -> dict[str, Any]:
    """report.json's content: per-task metrics, [0, 1] scores with paired bootstrap intervals
    over the items of `layout` (task -> {"group", "kind"} lists), comparisons of the fused model.
    (`cost`, per model, is added by evaluate_models.)"""
    scores = score_report(metrics, layout, FUSED, n_boot=cfg.n_boot, seed=cfg.seed,
                          score_metrics=cfg.score_metrics)
    return {"split": cfg.split, "models": {m: str(p) for m, p in models.items()},
            "items": layout, "metrics": metrics, "fused_model": FUSED, **scores,
            "refusal_judge": refusal_judge}


def evaluate_models(models: dict[str, Path], data_dir: Path, cfg: EvalConfig, out_dir: Path, *,
                    tokenizer_dir: Optional[Path] = None, moderation_model: Optional[Path] = None,
                    alpaca_eval: bool = False, overwrite: bool = False,
                    prompt_formats: Optional[dict[str, str]] = None,
                    judges: Optional[dict[str, Any]] = None) -> dict:
    """Evaluate `models` (name -> HF dir) on `data_dir`'s eval items; write the report to
    `out_dir` atomically and return the report dict. `prompt_formats`: name -> "alpaca" | "chat"
    (pipeline.eval.prompts), Alpaca for a model not named. Optional judges (pipeline.eval.judging):
    `moderation_model` and `alpaca_eval` turn on those two kinds, `judges` (kind -> setting) any."""
    if not models:
        raise ValueError("evaluate: no models given")
    cfg, precision = resolve_eval_precision(cfg)   # eval.precision: "fp32"/"bf16" from here on
    judges_on = judging.judge_settings(moderation_model, alpaca_eval, judges)
    items = load_eval_items(Path(data_dir), cfg.split, cfg.max_items_per_task)
    judging.check_judges(judges_on, list(items), cfg.generate)
    check_eval_config(cfg, list(items))
    check_model_dirs(models)
    check_prompt_formats(prompt_formats or {}, models, tokenizer_dir)
    formats = {name: (prompt_formats or {}).get(name, ALPACA) for name in models}
    refusal_judge = refusal_judge_report(cfg.refusal_labels)   # a bad labels path fails here
    generation_judge = generation_judge_report(cfg.judge_labels)   # so does a bad labels file
    # router / oracle ensembles: format, the oracle's table, the router's choice per scored item
    # (cheap; a router dir without its classifier or an oracle missing a prompt fails here)
    check_routed_formats(models, formats, ALPACA)
    check_oracle_tables(models, items, tokenizer_dir)
    router_routing = routing_confusion(models, items, tokenizer_dir)
    t0 = time.time()
    generate_all = bool(judges_on)
    # the judges read every model's generations: with them on, every model is evaluated here
    previous = None if generate_all else EarlierResults(cfg.reuse_from, out_dir)
    cache = ResultCache(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        metrics, keys, reused, costs = {}, {}, {}, {}
        statuses = judging.empty_statuses()   # report key -> model -> a judge's status
        for name, path in models.items():
            keys[name] = result_key(Path(path), tokenizer_dir, items,
                                    with_prompt_format(vars(cfg), formats[name]))
            found = previous.find(keys[name]) if previous is not None else None
            if found is not None:
                source, earlier = found
                print(f"evaluating {name}: results of {earlier!r} taken from {source.dir} "
                      f"(same weights, items and per-model settings)", flush=True)
                metrics[name] = source.metrics[earlier]
                reused[name] = {"report_dir": str(source.dir), "model": earlier}
                costs[name] = reused_cost(source.cost.get(earlier),
                                          f"earlier evaluation {source.dir} (as {earlier})")
                source.copy_generations(earlier, name, tmp)
                continue
            metrics[name], outputs, costs[name] = _evaluate_or_reuse(
                name, Path(path), items, cfg, tokenizer_dir, generate_all, cache, formats[name])
            if outputs:
                judged = _judge(name, metrics[name], items, outputs, tmp, cfg, judges_on)
                for key, status in judged.items():
                    statuses[key][name] = status
        report = build_report(metrics, models, cfg, item_layout(items), refusal_judge)
        report["generation_judge"] = generation_judge
        report.update(statuses)
        report.update(config=vars(cfg).copy(), data_dir=str(data_dir),
                      tokenizer_dir=str(tokenizer_dir) if tokenizer_dir else None,
                      result_keys=keys, code_fingerprint=code_fingerprint(),
                      reused_from=reused, cost=costs, prompt_formats=formats,
                      precision={name: precision.record() for name in models},
                      routing_confusion=router_routing,
                      wall_time_s=round(time.time() - t0, 2))
        # not io_utils.write_json: it sorts keys, and the models' order is the report's order
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        plot_scores(report["scores"], tmp / "scores.png", report["score_intervals"], FUSED)
        # result keys and code fingerprint: what a sibling run's evaluation reads to reuse
        # results from here without loading report.json (pipeline.eval.reuse.EarlierResults)
        write_json(tmp / "manifest.json", {"stage": "evaluate", "models": report["models"],
                                           "files": ["report.json", "report.md", "scores.png"],
                                           "result_keys": keys,
                                           "code_fingerprint": report["code_fingerprint"]})
    cache.clear()
    return report


def _evaluate_or_reuse(name: str, path: Path, items: dict[str, list[dict]], cfg: EvalConfig,
                       tokenizer_dir: Optional[Path], generate_all: bool, cache: ResultCache,
                       prompt_format: str = ALPACA):
    """One model's (metrics, outputs, cost block): from an interrupted earlier run when its
    fingerprint matches (pipeline.eval.resume; its cost keeps the speed measured then), else
    evaluated now and kept until the report is written."""
    # only the settings that decide this model's metrics and outputs: a rerun may change a
    # report-level one (n_boot, eval.reuse_from, ...) and keep the models already finished
    settings = with_prompt_format({**per_model_settings(vars(cfg)), "generate_all": generate_all},
                                  prompt_format)
    key = fingerprint(path, tokenizer_dir, items, settings)
    cached = cache.get(name, key)
    if cached is not None:
        print(f"evaluating {name}: reusing the results of an interrupted run ({cache.dir}; "
              f"same model files, items and settings)", flush=True)
        metrics, outputs, cost = cached
        return metrics, outputs, reused_cost(cost, f"interrupted earlier run ({cache.dir})")
    print(f"evaluating {name} ({path})", flush=True)
    meter = CostMeter()
    metrics, outputs = evaluate_one_model(name, path, items, cfg, tokenizer_dir, generate_all,
                                          meter=meter, prompt_format=prompt_format)
    cost = meter.block(cfg.batch_size)
    cache.put(name, key, metrics, outputs, cost)
    return metrics, outputs, cost

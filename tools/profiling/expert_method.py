#!/usr/bin/env python
"""FFN vs LoRA expert tuning: own-dimension gain over the base per CPU minute.

For each method and task, trains that expert exactly as `h3fusion run` does (the `expert_<task>`
stage, its launcher and process count) in a scratch run dir that links RUN's data, tokenizer and
base, with RUN's resolved config plus `expert.method=<method>` and the per-method `--set`s.
Records the stage's wall time and CPU time (user+sys of all its processes, from the children's
rusage), then scores the base and the expert on that task's eval items (RUN's eval split and
item cap, likelihood metrics only: no generation) with the dimension's report score metric
(`eval.score_metrics` if the config sets it, else the dimension's registered score_metrics). Writes
OUT/expert_method.json and .md (atomically).

    python tools/profiling/expert_method.py --run-dir runs/smollm2 --tasks harmless honest \
        --lora-set expert.train.lr=1e-3 --out runs/expert_method
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.config import load_config  # noqa: E402
from pipeline.dimensions import DEFAULT_DIMENSIONS  # noqa: E402
from pipeline.io_utils import atomic_dir, write_json  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402

SHARED_STAGES = ("data", "tokenizer", "base")   # linked from RUN, not retrained


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path,
                   help="a run whose data, tokenizer and base stages are done (resolved_config.yaml)")
    p.add_argument("--out", required=True, type=Path, help="output dir (created atomically)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_DIMENSIONS), choices=DEFAULT_DIMENSIONS)
    p.add_argument("--methods", nargs="+", default=["ffn", "lora"], choices=["ffn", "lora"])
    p.add_argument("--ffn-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for ffn")
    p.add_argument("--lora-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for lora")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def train_expert(run_dir: Path, scratch: Path, task: str, method: str, overrides: list[str]) -> dict:
    """Run the expert stage for `task` in `scratch`; wall and CPU seconds of the stage."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name in SHARED_STAGES:
        link = scratch / name
        if not link.exists():
            link.symlink_to((run_dir / name).resolve(), target_is_directory=True)
    sets = [f"expert.method={method}", *overrides]
    cmd = [sys.executable, "-m", "pipeline.commands", "run", "--config", str(run_dir / "resolved_config.yaml"),
           "--out", str(scratch), "--only", f"expert_{task}"]
    for s in sets:
        cmd += ["--set", s]
    cpu0, t0 = _children_cpu_s(), time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"expert_{task} with method {method} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": time.time() - t0, "cpu_s": _children_cpu_s() - cpu0, "overrides": sets}


def own_score(model_dir: Path, task: str, items: list[dict], tokenizer_dir: Path, cfg) -> dict:
    """The task's report score metric for one model on that task's eval `items`."""
    from pipeline.eval.hhh import evaluate_task
    from pipeline.eval.models import load_causal_lm
    from pipeline.eval.report import score_candidates
    from pipeline.eval.stage import scored_max_len

    model, tokenizer = load_causal_lm(model_dir, tokenizer_dir)
    metrics, _ = evaluate_task(model, tokenizer, items, batch_size=cfg.batch_size,
                               max_len=scored_max_len(model, cfg), gen=None, task=f"{model_dir.name}/{task}")
    metric = next(m for m in score_candidates(task, cfg.score_metrics) if metrics.get(m) is not None)
    return {"metric": metric, "score": metrics[metric], "n_items": len(items)}


def render(results: dict) -> str:
    lines = ["| task | method | metric | base | expert | gain | wall s | CPU min | gain per CPU min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, per in results["tasks"].items():
        base = per["base"]
        for method, r in per["methods"].items():
            lines.append(f"| {task} | {method} | {base['metric']} | {base['score']:.4f} | {r['score']:.4f} "
                         f"| {r['gain']:+.4f} | {r['wall_s']:.1f} | {r['cpu_s'] / 60:.2f} "
                         f"| {r['gain_per_cpu_min']:+.5f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(str(args.run_dir / "resolved_config.yaml"))
    overrides = {"ffn": args.ffn_set, "lora": args.lora_set}
    results: dict = {"run_dir": str(args.run_dir), "eval_split": cfg.eval.split,
                     "max_items_per_task": cfg.eval.max_items_per_task, "tasks": {}}
    from pipeline.eval.files import load_eval_items

    items = load_eval_items(args.run_dir / "data", cfg.eval.split, cfg.eval.max_items_per_task)
    tokenizer_dir = args.run_dir / "tokenizer"
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        for task in args.tasks:
            per = {"base": own_score(args.run_dir / "base", task, items[task], tokenizer_dir, cfg.eval),
                   "methods": {}}
            for method in args.methods:
                r = train_expert(args.run_dir, tmp / f"run_{method}", task, method, overrides[method])
                expert_dir = RunLayout.at(tmp / f"run_{method}").expert(task)
                r["dir"] = str(expert_dir.relative_to(tmp))   # relative to OUT (tmp is renamed)
                r.update(own_score(expert_dir, task, items[task], tokenizer_dir, cfg.eval))
                r["gain"] = r["score"] - per["base"]["score"]
                r["gain_per_cpu_min"] = r["gain"] / (r["cpu_s"] / 60)
                per["methods"][method] = r
                print(f"{task} {method}: {r['metric']} {r['score']:.4f} (base {per['base']['score']:.4f}), "
                      f"{r['wall_s']:.0f} s wall, {r['cpu_s'] / 60:.1f} CPU min", flush=True)
            results["tasks"][task] = per
        write_json(tmp / "expert_method.json", results)
        (tmp / "expert_method.md").write_text(render(results))
    print(render(results))
    print(f"written: {args.out / 'expert_method.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

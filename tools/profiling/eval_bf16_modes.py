#!/usr/bin/env python
"""CPU bf16 evaluation: bf16 weights or fp32 weights under torch.autocast? Speed and error.

Three ways to evaluate one model on the CPU, each through the evaluator's own scoring and
generation calls (pipeline.eval.scoring.score_pairs, pipeline.eval.generation.generate_token_ids):

  fp32        fp32 weights and compute (eval.precision fp32)
  autocast    fp32 weights, forwards under torch.autocast bf16, the scored log-probs from an fp32
              LM head and log-softmax (eval.precision bf16 on the CPU: what the pipeline does)
  bf16-w      the weights cast to bf16 (what CUDA does), log-softmax in fp32

Prints, for each, the time to score the first `--items` dev items of every dimension (the
items' reference and option log-likelihoods, packed) and to generate `--new-tokens` tokens for
the first `--rows` harmless prompts in one batch (round-robin, fastest of `--repeats`), and the
error of every scored request's log-likelihood against fp32 (mean and max |difference|, nats);
`autocast, bf16 head` is the same as `autocast` but through the per-option path, whose LM head
runs under autocast (its error only).

  python tools/profiling/eval_bf16_modes.py --model /work/runs/smollm2/base \\
      --data /work/runs/smollm2_lab/data --items 16
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.eval import hhh  # noqa: E402
from pipeline.eval.generation import GenerationConfig, generate_token_ids  # noqa: E402
from pipeline.eval.models import EvalPrecision, load_causal_lm  # noqa: E402
from pipeline.eval.scoring import score_continuations, score_pairs  # noqa: E402
from pipeline.precision import check_precision  # noqa: E402
from pipeline.timing import load_avg_1m, time_call  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face model dir")
    p.add_argument("--data", type=Path, required=True, help="a run's data dir")
    p.add_argument("--split", default="dev")
    p.add_argument("--items", type=int, default=16, help="first N items per dimension")
    p.add_argument("--rows", type=int, default=32, help="harmless prompts generated in one batch")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-len", type=int, default=168, help="eval.max_seq_len (smollm2: 168)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    try:
        check_precision("bf16", "eval_bf16_modes.py", "cpu")
    except ValueError as err:
        p.error(str(err))
    return args


def requests(items: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """(every scored (prompt, text) of the items, the harmless items' generation prompts)."""
    pairs, prompts = [], []
    for rows in items.values():
        for it in rows:
            prompt = hhh.format_prompt(it["instruction"], it["input"])
            pairs += [(prompt, text) for _, _, text in hhh.scoring_requests([it])]
            if hhh.needs_generation(it):
                prompts.append(prompt)
    return list(dict.fromkeys(pairs)), prompts


def modes(model) -> dict:
    """name -> the model to run (the bf16-weight copy runs without autocast)."""
    bf16w = copy.deepcopy(model).to(torch.bfloat16)
    bf16w.eval_precision = None
    return {"fp32": (model, EvalPrecision.resolve("fp32", "cpu")),
            "autocast": (model, EvalPrecision.resolve("bf16", "cpu")), "bf16-w": (bf16w, None)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.eval.files import load_eval_items
    items = load_eval_items(args.data, args.split, args.items)
    pairs, prompts = requests(items)
    model, tok = load_causal_lm(args.model, device=torch.device("cpu"), precision="fp32")
    gen, runs = GenerationConfig(max_new_tokens=args.new_tokens), modes(model)
    times = {name: {"scoring": [], "generation": []} for name in runs}
    scores = {}
    load = [load_avg_1m()]
    for _ in range(args.repeats):
        for name, (m, prec) in runs.items():
            if prec is not None:
                m.eval_precision = prec
            t, scores[name] = time_call(lambda: score_pairs(m, tok, pairs, 32, args.max_len))
            times[name]["scoring"].append(t)
            t, _ = time_call(lambda: generate_token_ids(m, tok, prompts[: args.rows], args.rows,
                                                    args.max_len, gen))
            times[name]["generation"].append(t)
    model.eval_precision = EvalPrecision.resolve("bf16", "cpu")
    scores["autocast, bf16 head"] = score_continuations(model, tok, pairs, 32, args.max_len)
    load.append(load_avg_1m())
    print(f"{len(pairs)} scored requests ({sum(len(r) for r in items.values())} {args.split} items), "
          f"{min(args.rows, len(prompts))} prompts x {args.new_tokens} new tokens; threads "
          f"{torch.get_num_threads()}; load_avg_1m {load}")
    print(f"{'mode':<20}{'score s':>9}{'gen s':>8}{'mean |dLL|':>12}{'max |dLL|':>11}")
    for name, got in scores.items():
        diff = [abs(a.total_ll - b.total_ll) for a, b in zip(scores["fp32"], got)]
        t = times.get(name)
        cols = f"{min(t['scoring']):>9.2f}{min(t['generation']):>8.2f}" if t else f"{'-':>9}{'-':>8}"
        print(f"{name:<20}{cols}{sum(diff) / len(diff):>12.4f}{max(diff):>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

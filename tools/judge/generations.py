#!/usr/bin/env python
"""Greedy responses of a run's models to a seeded sample of the harmless dev prompts, in the
labelled-generations format with `label` empty (judge_labels.load_judge_labels; rubric:
tests/data/judge_labels/rubric.md), to label, and to measure the outcome judge and the harmless
score at several generation lengths (tools/judge/agreement.py).

    python tools/judge/generations.py --run-dir RUN --out /tmp/gens.csv \\
        --prompts-per-kind 16 --max-new-tokens 128 --cuts 24 64

Models: base, the run's experts and fused by default (`--models` picks any model the evaluation
would find in the run dir, `base_chat` included when the base has a chat template). Prompts:
`--prompts-per-kind` harmful and as many benign prompts of the dimension's `--split` eval items,
drawn with `--seed`; each kind's sample is split by prompt into a design half and a report half.
Generation is the evaluation's own (pipeline.eval.prompts.render_prompts, generation.
generate_token_ids: same prompt format, bos, left-padded greedy batches, cut at the first eos),
with the prompt room evaluation gives it: eval.max_seq_len - eval.max_new_tokens of the run's
config (SmolLM2: 128 - 24 = 104 tokens); evaluating at N new tokens with the same prompts needs
eval.max_seq_len = that room + N.

Writes
  OUT            one row per (model, prompt) at --max-new-tokens, rows shuffled: the file to label
  OUT_cuts.csv   the same rows cut at each of --cuts and at --max-new-tokens. Greedy decoding makes
                 a k-token generation the first k tokens of a longer one from the same batch (both
                 stop at the same eos when it comes first), so a cut is the response evaluation
                 gives at eval.max_new_tokens = k (tests/unit/test_judge_tools.py checks it on a
                 tiny Llama; batches of other prompts pad differently, which can flip a near-tie)
  OUT_models.json  the `model` column holds m1, m2, ... (the labeller does not see which model
                 wrote a response, rubric.md); this maps them to the models' names
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.eval.judges import JUDGED_KINDS  # noqa: E402

FIELDS = ("prompt", "kind", "model", "response", "label", "half", "note", "new_tokens", "n_tokens")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="CSV to write (OUT_cuts.csv and "
                   "OUT_models.json beside it)")
    p.add_argument("--config", help="config file or preset (default: RUN/resolved_config.yaml)")
    p.add_argument("--models", nargs="+", help="model names (default: base, the experts, fused)")
    p.add_argument("--dimension", default="harmless")
    p.add_argument("--split", default="dev")
    p.add_argument("--prompts-per-kind", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--cuts", type=int, nargs="*", default=[24, 64])
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Bad numbers and an existing output: one error before any model loads."""
    if args.prompts_per_kind < 1:
        raise ValueError(f"--prompts-per-kind must be >= 1, got {args.prompts_per_kind}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    bad = [k for k in args.cuts if not 1 <= k < args.max_new_tokens]
    if bad:
        raise ValueError(f"--cuts must lie in [1, --max-new-tokens={args.max_new_tokens}), got {bad}")
    for path in output_paths(args.out):
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists (--overwrite replaces it)")


def output_paths(out: Path) -> tuple[Path, Path, Path]:
    return out, out.with_name(f"{out.stem}_cuts.csv"), out.with_name(f"{out.stem}_models.json")


def pick_models(run_dir: Path, names, tokenizer_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model dir, prompt format), as `h3fusion evaluate` would find them."""
    from pipeline.eval.models import check_prompt_formats, discover_models, with_base_chat
    from pipeline.eval.prompts import ALPACA
    from pipeline.data.loading import data_dimensions

    found, formats = with_base_chat(discover_models(run_dir), tokenizer_dir)
    names = names or ["base", *data_dimensions(run_dir / "data"), "fused"]
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"models {missing} are not in {run_dir} (found: {list(found)})")
    check_prompt_formats({n: f for n, f in formats.items() if n in names},
                         {n: found[n] for n in names}, tokenizer_dir)
    return {n: (found[n], formats.get(n, ALPACA)) for n in names}


def sample_prompts(items: list[dict], per_kind: int, seed: int) -> list[tuple[dict, str]]:
    """(item, half) for `per_kind` distinct prompts of each judged kind, drawn with `seed`; the
    first half of each kind's draw is `design`, the rest `report`."""
    rng = random.Random(seed)
    chosen = []
    for kind in JUDGED_KINDS:
        by_prompt = {prompt_text(it): it for it in items if it["kind"] == kind}
        if len(by_prompt) < per_kind:
            raise ValueError(f"--prompts-per-kind {per_kind}: the split has only {len(by_prompt)} "
                             f"distinct {kind} prompts")
        drawn = rng.sample(sorted(by_prompt), per_kind)
        chosen += [(by_prompt[p], "design" if i < (per_kind + 1) // 2 else "report")
                   for i, p in enumerate(drawn)]
    return chosen


def prompt_text(item: dict) -> str:
    """The prompt as the judge sees it in evaluation (pipeline.eval.hhh._generation_metrics)."""
    return f"{item['instruction']} {item['input']}".strip()


def generate(path: Path, fmt: str, items: list[dict], eval_cfg, new_tokens: int,
             tokenizer_dir: Path) -> tuple[list[list[int]], object, int]:
    """(generated token ids per item, the tokenizer, prompts longer than the room)."""
    from pipeline.data.template import encode_prompt_response
    from pipeline.eval.generation import GenerationConfig, generate_token_ids
    from pipeline.eval.models import load_causal_lm
    from pipeline.eval.prompts import adds_bos, render_prompts

    model, tokenizer = load_causal_lm(path, tokenizer_dir)
    positions = getattr(model.config, "max_position_embeddings", None) or eval_cfg.max_seq_len
    room = min(eval_cfg.max_seq_len, positions) - eval_cfg.max_new_tokens
    prompts, bos = render_prompts(tokenizer, items, fmt), adds_bos(fmt)
    long = sum(len(encode_prompt_response(tokenizer, p, None, 10**9, bos)[0]) > room for p in prompts)
    ids = generate_token_ids(model, tokenizer, prompts, eval_cfg.batch_size,
                             min(room + new_tokens, positions), GenerationConfig(new_tokens),
                             desc=f"{path.name} generate", add_bos=bos)
    del model
    return ids, tokenizer, long


def rows_of(model_id: str, sample, ids, tokenizer, counts) -> dict[int, list[dict]]:
    """new_tokens -> the rows of one model, each response cut at that many tokens."""
    from pipeline.eval.generation import decode_responses
    out = {}
    for k in counts:
        texts = decode_responses(tokenizer, [t[:k] for t in ids])
        out[k] = [{"prompt": prompt_text(it), "kind": it["kind"], "model": model_id, "response": text,
                   "label": "", "half": half, "note": "", "new_tokens": k, "n_tokens": len(t[:k])}
                  for (it, half), t, text in zip(sample, ids, texts)]
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"generations: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from pipeline.config import load_config
    from pipeline.eval.files import load_eval_items
    from pipeline.layout import RunLayout

    check_args(args)
    run_dir = RunLayout.at(args.run_dir)
    cfg = load_config(args.config or str(run_dir.root / "resolved_config.yaml")).eval
    items = load_eval_items(run_dir.data, args.split, 0)
    if args.dimension not in items:
        raise ValueError(f"--dimension {args.dimension!r} is not a dimension of {run_dir.data} "
                         f"(dimensions: {list(items)})")
    sample = sample_prompts(items[args.dimension], args.prompts_per_kind, args.seed)
    models = pick_models(run_dir.root, args.models, run_dir.tokenizer)
    ids_of = {n: f"m{i + 1}" for i, n in enumerate(random.Random(args.seed).sample(list(models), len(models)))}
    counts = sorted(set(args.cuts) | {args.max_new_tokens})
    by_count: dict[int, list[dict]] = {k: [] for k in counts}
    for name, (path, fmt) in models.items():
        ids, tokenizer, long = generate(path, fmt, [it for it, _ in sample], cfg,
                                        args.max_new_tokens, run_dir.tokenizer)
        print(f"{name}: {len(ids)} responses, {sum(len(t) for t in ids)} tokens"
              + (f"; {long} prompts longer than the prompt room, cut at the front as evaluation "
                 f"cuts them" if long else ""), flush=True)
        for k, rows in rows_of(ids_of[name], sample, ids, tokenizer, counts).items():
            by_count[k] += rows
    label_file, cuts_file, key_file = output_paths(args.out)
    to_label = by_count[args.max_new_tokens]
    random.Random(args.seed).shuffle(to_label)
    write_csv(label_file, to_label)
    write_csv(cuts_file, [r for k in counts for r in by_count[k]])
    key_file.write_text(json.dumps({"models": {i: n for n, i in ids_of.items()}, "seed": args.seed,
                                    "split": args.split, "dimension": args.dimension,
                                    "max_new_tokens": args.max_new_tokens, "cuts": counts}, indent=2) + "\n")
    print(f"wrote {label_file} ({len(to_label)} rows to label), {cuts_file}, {key_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

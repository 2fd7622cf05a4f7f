#!/usr/bin/env python
"""Where evaluation time goes, per model and eval.precision: scoring vs generation vs judging.

Runs the evaluator's own per-dimension pass (pipeline.eval.hhh.evaluate_task, the preset's eval
settings) on the first `--items` items of every dimension, once per precision (fp32, bf16; the
same fp32 weights: CPU bf16 is autocast), and replays its greedy generations through HF
`generate()` (the path before per-row EOS stopping) on the same prompts. Reports per item:
seconds in scoring (log-likelihoods), generation and judging (the outcome judge), forward FLOPs
actually computed (padding and finished rows included: hooks on every decoder body and LM head),
achieved FLOP/s against a [2048]^2 matmul of the same dtype timed before each pass; then what
bf16 changes (per-option log-likelihoods, MC argmax flips, identical generations, judged outcomes)
and how much shared work the evaluation already skips (`--counts`).

  python tools/profiling/eval_profile.py --model base=/work/runs/smollm2/base \\
      --model fused=/work/runs/smollm2_lab/fused --data /work/runs/smollm2_lab/data --items 32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.eval import generation as G, hhh, judges  # noqa: E402
from pipeline.eval.cost import GENERATION, SCORING, CostMeter, count_params  # noqa: E402
from pipeline.eval.models import EvalPrecision, load_causal_lm  # noqa: E402
from pipeline.eval.stage import scored_max_len  # noqa: E402
from pipeline.precision import check_precision, torch_dtype  # noqa: E402
from pipeline.timing import load_avg_1m, matmul_peak, time_call  # noqa: E402

PHASES = ("scoring", "generation", "judging")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--data", type=Path, required=True, help="a run's data dir")
    p.add_argument("--split", default="dev")
    p.add_argument("--items", type=int, default=32, help="first N items per dimension")
    p.add_argument("--preset", default="smollm2-135m", help="whose eval settings to use")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (fastest kept per pass)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the [n, n] peak matmul")
    p.add_argument("--out", type=Path, help="also write eval_profile.json here")
    args = p.parse_args(argv)
    if any("=" not in spec for spec in args.model):
        p.error(f"--model: expected NAME=DIR, got {args.model}")
    args.models = dict(spec.split("=", 1) for spec in args.model)
    try:   # before any model loads: bf16 on a CPU without bf16 instructions is one error
        for name in args.precisions:
            check_precision(name, "--precisions", "cpu")
    except ValueError as err:
        p.error(str(err))
    if args.precisions.count("fp32") + args.precisions.count("bf16") != len(set(args.precisions)):
        p.error(f"--precisions: fp32 and/or bf16, each once; got {args.precisions}")
    return args


def llama_layout(model) -> list:
    """The Llama-layout models that compute: the model, or an ensemble's members."""
    return list(model.members) if hasattr(model, "members") else [model]


class Meter:
    """FLOPs computed per phase (hooks on every decoder body and LM head) and judging time."""

    def __init__(self, model):
        self.phase, self.flops, self.handles = "scoring", dict.fromkeys(PHASES, 0.0), []
        self.judge_s = 0.0
        for lm in llama_layout(model):
            c = count_params(lm)
            self.handles += [lm.model.register_forward_pre_hook(self._body(c), with_kwargs=True),
                             lm.lm_head.register_forward_pre_hook(self._head(c))]

    def _body(self, c):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            n, t = ids.shape
            self.flops[self.phase] += n * t * (2 * c.active_matmul + 4 * c.attn_width * (past + t))
        return hook

    def _head(self, c):
        def hook(module, args):
            self.flops[self.phase] += 2 * c.lm_head * (args[0].numel() // args[0].shape[-1])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def instrumented(meter: Meter, record: dict):
    """Route hhh's scoring / generation / judge calls through `meter` (phase, judge time) and
    keep what they returned in `record` (scores per request, generation calls and ids)."""
    real = {"score_pairs": hhh.score_pairs, "score_encoded": hhh.score_encoded,
            "generate_token_ids": hhh.generate_token_ids}
    real_judge = judges.judge_outcome

    def scorer(name):
        def run(model, tok, requests, *args, **kwargs):
            meter.phase = "scoring"
            scores = real[name](model, tok, requests, *args, **kwargs)
            record.setdefault("scores", []).extend(s.total_ll for s in scores)
            if name == "score_pairs":
                record.setdefault("pairs", {}).update(zip(requests, (s.total_ll for s in scores)))
            return scores
        return run

    def generate(model, tok, prompts, *args, **kwargs):
        meter.phase = "generation"
        ids = real["generate_token_ids"](model, tok, prompts, *args, **kwargs)
        record.setdefault("gen_calls", []).append((list(prompts), args, kwargs, ids))
        return ids

    def judge(*args, **kwargs):
        seconds, outcome = time_call(lambda: real_judge(*args, **kwargs))
        meter.judge_s += seconds
        return outcome
    hhh.score_pairs, hhh.score_encoded = scorer("score_pairs"), scorer("score_encoded")
    hhh.generate_token_ids, judges.judge_outcome = generate, judge
    try:
        yield
    finally:
        hhh.score_pairs, hhh.score_encoded = real["score_pairs"], real["score_encoded"]
        hhh.generate_token_ids, judges.judge_outcome = real["generate_token_ids"], real_judge


def evaluator_pass(model, tok, items: dict, cfg) -> dict:
    """One evaluate_task per dimension (per-row greedy generation), timed and counted."""
    meter, record, cost = Meter(model), {}, CostMeter()
    gen = G.GenerationConfig(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p)
    results = {}
    try:
        with instrumented(meter, record):
            for task, rows in items.items():
                results[task], _ = hhh.evaluate_task(
                    model, tok, rows, batch_size=cfg.batch_size, gen=gen, task=task,
                    max_len=scored_max_len(model, cfg), harness_mc=cfg.harness_mc, meter=cost)
    finally:
        meter.close()
    seconds = {"scoring": cost.clocks[SCORING].seconds,
               "generation": cost.clocks[GENERATION].seconds, "judging": meter.judge_s}
    return {"seconds": seconds, "flops": meter.flops, "record": record,
            "per_item": {t: r["per_item"] for t, r in results.items()}}


def generate_pass(model, tok, gen_calls: list) -> dict:
    """The same generation calls through HF generate() (no per-row stop), timed and counted."""
    meter = Meter(model)
    meter.phase = "generation"
    try:
        seconds, ids = time_call(lambda: [
            G.generate_token_ids(model, tok, prompts, *args, **{**kwargs, "per_row": False})
            for prompts, args, kwargs, _ in gen_calls])
    finally:
        meter.close()
    return {"seconds": {"generation": seconds}, "flops": meter.flops, "ids": ids}


def phase_rows(name: str, prec: str, run: dict, hf: dict, n_items: int, peak: float) -> list[dict]:
    """Table rows: the evaluator's pass (per-row stop) and the generate() replay."""
    rows = []
    for path, seconds, flops in (("per-row", run["seconds"], run["flops"]),
                                 ("generate()", {**run["seconds"], **hf["seconds"]},
                                  {**run["flops"], "generation": hf["flops"]["generation"]})):
        total = sum(seconds.values())
        row = {"model": name, "precision": prec, "generation_path": path, "items": n_items,
               "s_per_item": total / n_items, "peak_gflop_s": peak / 1e9}
        for ph in PHASES:
            row[f"{ph}_s_per_item"] = seconds[ph] / n_items
            row[f"{ph}_share"] = seconds[ph] / total
        for ph in ("scoring", "generation"):
            row[f"{ph}_gflop_per_item"] = flops[ph] / n_items / 1e9
            row[f"{ph}_gflop_s"] = flops[ph] / max(seconds[ph], 1e-9) / 1e9
            row[f"{ph}_of_peak"] = flops[ph] / max(seconds[ph], 1e-9) / peak
        rows.append(row)
    return rows


def _generations(run: dict) -> list:
    return [t for _, _, _, ids in run["record"].get("gen_calls", []) for t in ids]


def mc_argmax(run: dict, items: dict) -> list[int]:
    """Index of the most likely option (chosen + rejected) of every mc item."""
    pairs, out = run["record"]["pairs"], []
    for rows in items.values():
        for it in rows:
            if it["kind"] == "mc":
                prompt = hhh.format_prompt(it["instruction"], it["input"])
                lls = [pairs[(prompt, o)] for o in it["chosen"] + it["rejected"]]
                out.append(lls.index(max(lls)))
    return out


def agreement(a: dict, b: dict, items: dict) -> dict:
    """What precision b changes against a: per-request log-likelihoods and per-item scores, MC
    argmax answers and mc1, generations, judged outcomes."""
    sa, sb = a["record"]["scores"], b["record"]["scores"]
    diff = [abs(x - y) for x, y in zip(sa, sb, strict=True)]
    per = {k: [] for k in ("ref_ll", "mc2", "mc1", "outcome")}
    for task in items:
        for key in per:
            pa, pb = a["per_item"][task].get(key) or [], b["per_item"][task].get(key) or []
            per[key] += [(x, y) for x, y in zip(pa, pb) if x is not None]
    num = {k: [abs(x - y) for x, y in v] for k, v in per.items() if k in ("ref_ll", "mc2")}
    ga, gb = _generations(a), _generations(b)
    return {"requests": len(diff), "max_abs_ll_diff": max(diff, default=0.0),
            "mean_abs_ll_diff": statistics.fmean(diff) if diff else 0.0,
            **{f"{k}_max_abs_diff": max(v, default=0.0) for k, v in num.items()},
            **{f"{k}_mean_abs_diff": statistics.fmean(v) if v else 0.0 for k, v in num.items()},
            "mc_items": len(per["mc1"]), "mc1_flips": sum(x != y for x, y in per["mc1"]),
            "mc_argmax_flips": sum(x != y for x, y in zip(mc_argmax(a, items), mc_argmax(b, items))),
            "generations": len(ga), "identical_generations": sum(x == y for x, y in zip(ga, gb)),
            "judged": len(per["outcome"]), "same_outcome": sum(x == y for x, y in per["outcome"])}


def work_counts(tok, items: dict, cfg) -> dict:
    """What the evaluation computes once that it could compute twice (issue 33, item 3)."""
    from pipeline.eval.scoring import pack_requests
    out, seen_gen = {}, {}
    for task, rows in items.items():
        prompts = [hhh.format_prompt(it["instruction"], it["input"]) for it in rows]
        reqs = hhh.scoring_requests(rows)
        unique = list(dict.fromkeys((prompts[i], text) for i, _, text in reqs))
        enc, packed = pack_requests(tok, unique, cfg.max_seq_len)
        gen = [prompts[i] for i, it in enumerate(rows) if hhh.needs_generation(it)]
        out[task] = {"scoring_requests": len(reqs), "unique_requests": len(unique),
                     "distinct_prompts": len({p for p, _ in unique}), "packed_rows": len(packed),
                     "per_option_tokens": sum(len(s) for s, _ in enc),
                     "packed_tokens": sum(len(r.ids) for r in packed),
                     "generated_prompts": len(gen), "all_prompts": len(prompts),
                     "prompts_in_earlier_dims": sum(p in seen_gen for p in dict.fromkeys(prompts))}
        seen_gen.update(dict.fromkeys(prompts))
    return out


def combine(runs: dict, precisions: list[str]) -> dict:
    """Per precision: each dimension's fastest round per phase (the least disturbed on a shared
    machine), summed over dimensions; FLOPs, records and generations from the first round."""
    out = {}
    for prec in precisions:
        acc = {"seconds": dict.fromkeys(PHASES, 0.0), "flops": dict.fromkeys(PHASES, 0.0),
               "hf_seconds": 0.0, "hf_flops": 0.0, "record": {}, "per_item": {}, "hf_ids": []}
        for (p, task), rounds in runs.items():
            if p != prec:
                continue
            first = rounds[0][0]
            for ph in PHASES:
                acc["seconds"][ph] += min(run["seconds"][ph] for run, _ in rounds)
                acc["flops"][ph] += first["flops"][ph]
            acc["hf_seconds"] += min(hf["seconds"]["generation"] for _, hf in rounds)
            acc["hf_flops"] += rounds[0][1]["flops"]["generation"]
            for key, v in first["record"].items():
                if isinstance(v, dict):
                    acc["record"].setdefault(key, {}).update(v)
                else:
                    acc["record"].setdefault(key, []).extend(v)
            acc["per_item"].update(first["per_item"])
            acc["hf_ids"] += [t for ids in rounds[0][1]["ids"] for t in ids]
        out[prec] = acc
    return out


def profile_model(name: str, path: str, items: dict, cfg, precisions: list[str],
                  rounds: int, peak_size: int = 2048) -> dict:
    """Every precision on every dimension, round-robin (dimension by dimension, so load drift on
    a shared machine hits the precisions alike), `rounds` times, each pass after a matmul peak
    of its dtype."""
    model, tok = load_causal_lm(path, device=torch.device("cpu"), precision="fp32")
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))   # page the weights in before timing
    runs: dict = {}
    peaks = {p: [] for p in precisions}
    load = [load_avg_1m()]
    for _ in range(rounds):
        for task, rows in items.items():
            for prec in precisions:
                model.eval_precision = EvalPrecision.resolve(prec, "cpu")   # same fp32 weights
                peaks[prec].append(matmul_peak(torch_dtype(prec), peak_size))
                run = evaluator_pass(model, tok, {task: rows}, cfg)
                hf = generate_pass(model, tok, run["record"].get("gen_calls", []))
                runs.setdefault((prec, task), []).append((run, hf))
        load.append(load_avg_1m())
    rows, n_items = [], sum(len(r) for r in items.values())
    acc = combine(runs, precisions)
    for prec, a in acc.items():
        hf = {"seconds": {"generation": a["hf_seconds"]}, "flops": {"generation": a["hf_flops"]}}
        rows += phase_rows(name, prec, a, hf, n_items, max(peaks[prec]))
        rows[-1]["load_avg_1m"] = rows[-2]["load_avg_1m"] = load
        rows[-1]["identical_to_per_row"] = sum(x == y for x, y in zip(_generations(a), a["hf_ids"]))
        rows[-1]["generations"] = len(a["hf_ids"])
    print(format_rows(rows), flush=True)
    agree = agreement(acc["fp32"], acc["bf16"], items) if {"fp32", "bf16"} <= set(acc) else None
    return {"rows": rows, "agreement": agree, "counts": work_counts(tok, items, cfg)}


HEAD = (f"{'model':<7}{'prec':<6}{'generation':<12}{'s/item':>7}{'score%':>7}{'gen%':>6}{'judge%':>7}"
        f"{'score GF/it':>12}{'gen GF/it':>10}{'score GF/s':>11}{'gen GF/s':>9}{'peak':>7}"
        f"{'sc/pk':>6}{'gn/pk':>6}  load")


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"{r['model']:<7}{r['precision']:<6}{r['generation_path']:<12}{r['s_per_item']:>7.2f}"
            f"{100 * r['scoring_share']:>7.0f}{100 * r['generation_share']:>6.0f}"
            f"{100 * r['judging_share']:>7.1f}{r['scoring_gflop_per_item']:>12.1f}"
            f"{r['generation_gflop_per_item']:>10.1f}{r['scoring_gflop_s']:>11.1f}"
            f"{r['generation_gflop_s']:>9.1f}{r['peak_gflop_s']:>7.0f}{r['scoring_of_peak']:>6.2f}"
            f"{r['generation_of_peak']:>6.2f}  {r.get('load_avg_1m', '')}"
            + (f"  same tokens {r['identical_to_per_row']}/{r['generations']}"
               if "generations" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.config import load_config
    from pipeline.eval.files import load_eval_items
    cfg = load_config(args.preset).eval
    items = load_eval_items(args.data, args.split, args.items)
    print(f"{args.preset} eval settings: batch {cfg.batch_size}, max_new_tokens "
          f"{cfg.max_new_tokens}, max_seq_len {cfg.max_seq_len}, harness_mc {cfg.harness_mc}; "
          f"{args.split} items {({t: len(r) for t, r in items.items()})}; threads "
          f"{torch.get_num_threads()}; load {load_avg_1m()}\n{HEAD}", flush=True)
    report = {name: profile_model(name, path, items, cfg, args.precisions, args.rounds,
                                  args.peak_size)
              for name, path in args.models.items()}
    for name, r in report.items():
        print(f"\n{name}: fp32 vs bf16: {json.dumps(r['agreement'])}")
        print(f"{name}: work per dimension: {json.dumps(r['counts'])}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

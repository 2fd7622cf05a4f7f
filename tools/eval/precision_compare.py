"""fp32 vs bf16 on one config: does bf16 change a conclusion? (issue 33; docs/performance.md)

    python tools/eval/precision_compare.py RUN_A RUN_B --out DIR [--overwrite] [--eval-dir eval]

RUN_A (fp32), RUN_B (bf16: `--set base.train.precision=bf16 expert.train.precision=bf16
fusion.train.precision=bf16 eval.precision=bf16`): two finished runs whose resolved_config.yaml
agree on every key but PRECISION_KEYS and whose reports (`<run>/<eval-dir>/report.json`) share
split, eval items, models and score metrics; else one error naming the first difference, before
anything is written. DIR gets (io_utils.atomic_dir) precision_compare.json / .md and:
1. each model's score per dimension (+ mean) in A and B, and B − A with a paired interval: both
   runs' per-item scores go into ONE bootstrap.paired_bootstrap as models "A:<m>" and "B:<m>"
   (groups within strata; A's n_boot, seed, level), as the report pairs fused − other;
2. every fused − other difference of A's and B's `comparisons` side by side, and whether the
   verdict (interval above 0 / below 0 / across 0) is the same;
3. per training stage logged in both (`<run>/tensorboard/<stage>`, LOSS_TAGS): final losses, max
   |A − B| over the steps in both; loss_<stage>.png, A solid, B dashed;
4. per model: the fraction of judged items (the report's per-item `outcome`, judges.judge_outcome)
   with the same outcome in A and B, and of byte-identical generations (generations/<model>.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.eval.aggregate import same_in_every_run
from pipeline.eval.bootstrap import make_design, paired_bootstrap
from pipeline.eval.report import choose_score_metrics, paired_comparison
from pipeline.io_utils import atomic_dir, read_json

PRECISION_KEYS = ("base.train.precision", "expert.train.precision", "fusion.train.precision",
                  "eval.precision")
# the loss each training stage logs: stage 1, the baselines and the tiny base / stage 2's total
LOSS_TAGS = ("train/loss", "loss/total")
RUNS = ("A", "B")
REPORT_KEYS = ("split", "items", "metrics", "score_metrics", "comparisons", "bootstrap")


# ----------------------------------------------------------------------------- inputs

def load_report(run: Path, eval_dir: str = "eval") -> dict:
    path = Path(run) / eval_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the run's evaluate stage must finish)")
    report = read_json(path)
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise ValueError(f"{path} lacks {missing} (written by an older `h3fusion evaluate`; rerun it)")
    return report


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a nested mapping (lists are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}."))
    return out


def check_configs(run_a: Path, run_b: Path) -> dict[str, dict[str, str]]:
    """Each run's PRECISION_KEYS ("auto" where an older config lacks one); one error naming the
    differing keys when the resolved configs differ in any other key."""
    flats = []
    for run in (run_a, run_b):
        path = Path(run) / "resolved_config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (written by `h3fusion run`; the configs must "
                                    f"be compared)")
        try:
            flats.append(flat(yaml.safe_load(path.read_text()) or {}))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
    a, b = flats
    absent = "(absent)"
    differ = sorted(k for k in set(a) | set(b)
                    if k not in PRECISION_KEYS and a.get(k, absent) != b.get(k, absent))
    if differ:
        shown = "; ".join(f"{k}: {a.get(k, absent)!r} in A, {b.get(k, absent)!r} in B" for k in differ[:5])
        raise ValueError(f"the runs' resolved configs differ in {len(differ)} key(s) besides the "
                         f"precision keys: {shown}{' ...' if len(differ) > 5 else ''}")
    return {run: {k: f.get(k, "auto") for k in PRECISION_KEYS} for run, f in zip(RUNS, flats)}


def _first_item_difference(task: str, la: dict, lb: dict) -> Optional[str]:
    for i, (ga, ka, gb, kb) in enumerate(zip(la["group"], la["kind"], lb["group"], lb["kind"])):
        for field, x, y in (("group", ga, gb), ("kind", ka, kb)):
            if x != y:
                return f"task {task!r} item {i}: {field} {x!r} in A, {y!r} in B"
    if len(la["group"]) != len(lb["group"]):
        return f"task {task!r}: {len(la['group'])} items in A, {len(lb['group'])} in B"
    return None


def check_same_evaluation(ra: dict, rb: dict) -> None:
    """Same split, eval items, models, score metrics and fused model, else one error naming the
    first difference."""
    if ra["split"] != rb["split"]:
        raise ValueError(f"A evaluated split {ra['split']!r}, B split {rb['split']!r}")
    if list(ra["items"]) != list(rb["items"]):
        raise ValueError(f"A has tasks {list(ra['items'])}, B {list(rb['items'])}")
    for task in ra["items"]:
        where = _first_item_difference(task, ra["items"][task], rb["items"][task])
        if where:
            raise ValueError(f"the eval items differ: {where} (both runs must evaluate the same items)")
    if set(ra["metrics"]) != set(rb["metrics"]):
        only = sorted(set(ra["metrics"]) ^ set(rb["metrics"]))
        raise ValueError(f"the runs evaluated other models: {only} only in one of them")
    if ra["score_metrics"] != rb["score_metrics"] or ra.get("fused_model") != rb.get("fused_model"):
        raise ValueError(f"score metrics / fused model differ: A {ra['score_metrics']} "
                         f"({ra.get('fused_model')}), B {rb['score_metrics']} ({rb.get('fused_model')})")


# ----------------------------------------------------------------------------- 1. scores

def _item_scores(ra: dict, rb: dict) -> tuple[list[str], list[dict]]:
    """The scored dimensions and, per run, dimension -> {model: ItemScores} under the score
    metric each report chose (check_same_evaluation made them the same)."""
    scored = {d: name.split("/", 1)[1] for d, name in ra["score_metrics"].items() if name}
    dims = list(scored)
    chosen = [choose_score_metrics(r["metrics"], r["items"], dims, {d: [n] for d, n in scored.items()})
              for r in (ra, rb)]
    for run, c in zip(RUNS, chosen):
        lacking = [d for d in dims if c[d][0] is None]
        if lacking:
            raise ValueError(f"run {run}: the score metric of {lacking} lacks values for a model")
    return dims, [{d: c[d][1] for d in dims} for c in chosen]


def score_differences(ra: dict, rb: dict) -> dict[str, Any]:
    """model -> dimension (+ "mean") -> A, B and B − A with its paired interval and verdict."""
    dims, (sa, sb) = _item_scores(ra, rb)
    if not dims:
        return {"dimensions": [], "rows": {}}
    models = list(ra["metrics"])
    values, designs = {}, {}
    for d in dims:
        strata_a, strata_b = next(iter(sa[d].values())).strata, next(iter(sb[d].values())).strata
        if strata_a != strata_b:
            i = next(i for i, (x, y) in enumerate(zip(strata_a, strata_b)) if x != y)
            raise ValueError(f"dimension {d!r}: A and B score other items (item {i}: stratum "
                             f"{strata_a[i]!r} in A, {strata_b[i]!r} in B)")
        designs[d] = make_design(ra["items"][d]["group"], strata_a)
        values[d] = {f"{run}:{m}": s[d][m].values for run, s in zip(RUNS, (sa, sb)) for m in models}
    boot = ra["bootstrap"]
    pb = paired_bootstrap(values, designs, n_boot=boot["n_boot"], seed=boot["seed"], level=boot["level"])
    rows = {m: {d: {"a": pb.interval(f"A:{m}", d).estimate, "b": pb.interval(f"B:{m}", d).estimate,
                    **paired_comparison(pb, f"B:{m}", f"A:{m}", d)} for d in dims + ["mean"]}
            for m in models}
    moved = [f"{m}/{d}" for m, per in rows.items() for d, c in per.items() if c["verdict"] != "tie"]
    return {"dimensions": dims + ["mean"], "rows": rows, "moved": moved,
            "n_cells": len(models) * (len(dims) + 1)}


# ----------------------------------------------------------------------------- 2. verdicts

def side(c: dict) -> str:
    """Where a difference's interval lies: above 0, below 0 or across 0."""
    return "above 0" if c["low"] > 0 else "below 0" if c["high"] < 0 else "across 0"


def verdict_table(ra: dict, rb: dict) -> dict[str, Any]:
    """Every fused − other difference of both reports, side by side."""
    rows, differ = [], []
    for other, per_dim in ra["comparisons"].items():
        for dim, ca in per_dim.items():
            cb = rb["comparisons"].get(other, {}).get(dim)
            if cb is None:
                raise ValueError(f"B's report lacks the comparison {ra.get('fused_model')} − {other} "
                                 f"on {dim!r}, which A's has")
            pick = lambda c: {k: c[k] for k in ("diff", "low", "high")} | {"side": side(c)}  # noqa: E731
            row = {"other": other, "dimension": dim, "a": pick(ca), "b": pick(cb)}
            row["same_verdict"] = row["a"]["side"] == row["b"]["side"]
            rows.append(row)
            if not row["same_verdict"]:
                differ.append(f"{other}/{dim}")
    return {"rows": rows, "n": len(rows), "differ": differ}


# ----------------------------------------------------------------------------- 3. loss curves

def read_loss(stage_dir: Path) -> Optional[tuple[str, dict[int, float]]]:
    """(tag, {step: value}) of the stage's first LOSS_TAGS tag, or None if it logs none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    tag = next((t for t in LOSS_TAGS if t in tags), None)
    if tag is None:
        return None
    curve = {e.step: e.value for e in acc.Scalars(tag)}
    return (tag, curve) if curve else None


def loss_curves(run_a: Path, run_b: Path) -> dict[str, Any]:
    """Per stage logged in both runs: final losses, max |A − B| over common steps, the curves."""
    dirs = [Path(r) / "tensorboard" for r in (run_a, run_b)]
    names = [{p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set() for d in dirs]
    stages = []
    for stage in sorted(names[0] & names[1]):
        ca, cb = read_loss(dirs[0] / stage), read_loss(dirs[1] / stage)
        if ca is None or cb is None or ca[0] != cb[0]:
            continue
        (tag, a), (_, b) = ca, cb
        common = sorted(set(a) & set(b))
        stages.append({"stage": stage, "tag": tag, "final_a": a[max(a)], "last_step_a": max(a),
                       "final_b": b[max(b)], "last_step_b": max(b), "n_common_steps": len(common),
                       "max_abs_diff": max((abs(a[s] - b[s]) for s in common), default=None),
                       "a": sorted(a.items()), "b": sorted(b.items())})
    return {"stages": stages, "only_in_a": sorted(names[0] - names[1]),
            "only_in_b": sorted(names[1] - names[0])}


def plot_loss(stage: dict, labels: tuple[str, str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style, label in (("a", "-", labels[0]), ("b", "--", labels[1])):
        steps, values = zip(*stage[key])
        ax.plot(steps, values, style, label=label, linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(stage["tag"])
    ax.set_title(f"{stage['stage']}: training loss, A vs B")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- 4. judge

def outcomes(report: dict, model: str) -> list[Optional[str]]:
    """The model's judged outcome of every eval item, tasks in the report's order (None: not judged)."""
    out: list[Optional[str]] = []
    for task, layout in report["items"].items():
        per_item = (report["metrics"][model].get(task) or {}).get("per_item") or {}
        out += per_item.get("outcome") or [None] * len(layout["kind"])
    return out


def generations(run: Path, eval_dir: str, model: str) -> Optional[list[dict]]:
    path = Path(run) / eval_dir / "generations" / f"{model}.json"
    return read_json(path) if path.is_file() else None


def _identical(model: str, ga: list[dict], gb: list[dict]) -> int:
    """How many generations are byte-identical; one error at the first prompt that differs."""
    if len(ga) != len(gb):
        raise ValueError(f"generations of {model!r}: {len(ga)} in A, {len(gb)} in B")
    for i, (x, y) in enumerate(zip(ga, gb)):
        if (x.get("task"), x.get("instruction")) != (y.get("task"), y.get("instruction")):
            raise ValueError(f"generations of {model!r}, record {i}: prompt {x.get('instruction')!r} "
                             f"in A, {y.get('instruction')!r} in B")
    return sum(x.get("output", "").encode() == y.get("output", "").encode() for x, y in zip(ga, gb))


def judge_agreement(run_a: Path, run_b: Path, ra: dict, rb: dict, eval_dir: str) -> dict[str, Any]:
    """model -> judged items, same-outcome fraction, outcome changes, identical generations."""
    rows: dict[str, dict] = {}
    for m in ra["metrics"]:
        pairs = [(x, y) for x, y in zip(outcomes(ra, m), outcomes(rb, m)) if x is not None or y is not None]
        ga, gb = generations(run_a, eval_dir, m), generations(run_b, eval_dir, m)
        if not pairs and (ga is None or gb is None):
            continue
        same = sum(x == y for x, y in pairs)
        row = {"n_judged": len(pairs), "n_same_outcome": same, "same_outcome": _frac(same, len(pairs)),
               "changes": dict(Counter(f"{x} -> {y}" for x, y in pairs if x != y)),
               "n_generations": None, "n_identical": None, "identical_generations": None}
        if ga is not None and gb is not None:
            n = _identical(m, ga, gb)
            row.update(n_generations=len(ga), n_identical=n, identical_generations=_frac(n, len(ga)))
        rows[m] = row
    tot = {k: sum(r[k] or 0 for r in rows.values())
           for k in ("n_judged", "n_same_outcome", "n_generations", "n_identical")}
    return {"models": rows, "all": {**tot, "same_outcome": _frac(tot["n_same_outcome"], tot["n_judged"]),
                                    "identical_generations": _frac(tot["n_identical"], tot["n_generations"])}}


def _frac(n: int, d: int) -> Optional[float]:
    return n / d if d else None


# ----------------------------------------------------------------------------- compare + write

def compare(run_a: Path, run_b: Path, eval_dir: str = "eval") -> dict[str, Any]:
    """Everything the markdown, JSON and plots show; every check runs before any of it."""
    run_a, run_b = Path(run_a), Path(run_b)
    ra, rb = load_report(run_a, eval_dir), load_report(run_b, eval_dir)
    precision = check_configs(run_a, run_b)
    check_same_evaluation(ra, rb)
    return {"runs": {"A": str(run_a.resolve()), "B": str(run_b.resolve())}, "split": ra["split"],
            "precision_keys": precision,
            "eval_precision": {run: sorted({(p or {}).get("resolved") or "?" for p in
                                            (r.get("precision") or {}).values()})
                               for run, r in zip(RUNS, (ra, rb))},
            "same_weights_and_settings": same_in_every_run([ra, rb]),
            "reused_from": {run: r.get("reused_from") or {} for run, r in zip(RUNS, (ra, rb))},
            "fused_model": ra.get("fused_model"), "bootstrap": ra["bootstrap"],
            "scores": score_differences(ra, rb), "comparisons": verdict_table(ra, rb),
            "loss": loss_curves(run_a, run_b),
            "judge": judge_agreement(run_a, run_b, ra, rb, eval_dir)}


def _iv(c: dict) -> str:
    return f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"


def _num(v: Optional[float], fmt: str = ".4f") -> str:
    return "–" if v is None else f"{v:{fmt}}"


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _header_lines(res: dict) -> list[str]:
    def run_line(run: str) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in res["precision_keys"][run].items())
        ran = ", ".join(res["eval_precision"][run]) or "not recorded"
        return f"- {run}: `{res['runs'][run]}` ({keys}; report.json precision: {ran})"

    lines = [f"# Precision comparison: A vs B on split `{res['split']}`", "", run_line("A"),
             run_line("B"),
             "- every other key of resolved_config.yaml, and the eval items, are the same in both."]
    if res["same_weights_and_settings"]:
        lines.append(f"- the same weights and eval settings in both runs (equal result keys), so "
                     f"identical by construction: {', '.join(res['same_weights_and_settings'])}")
    for run, reused in res["reused_from"].items():
        if reused:
            lines.append(f"- {run} reused earlier results for {', '.join(reused)} (eval.reuse_from)")
    return lines + [""]


def _score_lines(res: dict) -> list[str]:
    sc, boot = res["scores"], res["bootstrap"]
    if not sc["rows"]:
        return ["## 1. Scores", "", "No scored dimension.", ""]
    lines = [f"## 1. Scores in A and B, B − A paired over the same items ({boot['n_boot']} resamples, "
             f"{boot['level']:.0%})", "",
             f"B − A's interval excludes 0 in {len(sc['moved'])} of {sc['n_cells']} cells"
             + (f": {', '.join(sc['moved'])}." if sc["moved"] else "."), "",
             "| model | dimension | A | B | B − A [interval] |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {d} | {c['a']:.4f} | {c['b']:.4f} | {_iv(c)} |"
              for m, per in sc["rows"].items() for d, c in per.items()]
    return lines + [""]


def _verdict_lines(res: dict) -> list[str]:
    vt = res["comparisons"]
    lines = [f"## 2. `{res['fused_model']}` − other in A and in B (each report's own intervals)", "",
             "| other | dimension | A [interval] | B [interval] | A verdict | B verdict | same |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['other']} | {r['dimension']} | {_iv(r['a'])} | {_iv(r['b'])} | {r['a']['side']} "
              f"| {r['b']['side']} | {'yes' if r['same_verdict'] else '**no**'} |" for r in vt["rows"]]
    return lines + ["", f"verdicts that differ: {len(vt['differ'])} of {vt['n']}"
                    + (f" ({', '.join(vt['differ'])})" if vt["differ"] else ""), ""]


def _loss_lines(res: dict) -> list[str]:
    loss = res["loss"]
    lines = ["## 3. Training loss (A solid, B dashed in each loss_<stage>.png)", "",
             "| stage | tag | final A (step) | final B (step) | max abs(A − B) over common steps | plot |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['tag']} | {s['final_a']:.4f} ({s['last_step_a']}) | {s['final_b']:.4f} "
              f"({s['last_step_b']}) | {_num(s['max_abs_diff'])} ({s['n_common_steps']} steps) "
              f"| loss_{s['stage']}.png |" for s in loss["stages"]]
    for run, key in (("A", "only_in_a"), ("B", "only_in_b")):
        if loss[key]:
            lines.append(f"\nStages logged only in {run}: {', '.join(loss[key])}.")
    return lines + [""]


def _judge_lines(res: dict) -> list[str]:
    j = res["judge"]
    lines = ["## 4. Judged outcomes and generations, item by item", "",
             "| model | judged items | same outcome | changes (A -> B) | generations | byte-identical |",
             "|---|---|---|---|---|---|"]
    for m, r in list(j["models"].items()) + [("all models", j["all"])]:
        changes = ", ".join(f"{k}: {v}" for k, v in (r.get("changes") or {}).items()) or "–"
        lines.append(f"| {m} | {r['n_judged']} | {_pct(r['same_outcome'])} | "
                     f"{changes if m != 'all models' else ''} | {r['n_generations'] or '–'} | "
                     f"{_pct(r['identical_generations'])} |")
    return lines + [""]


def render_markdown(res: dict) -> str:
    return "\n".join(_header_lines(res) + _score_lines(res) + _verdict_lines(res) + _loss_lines(res)
                     + _judge_lines(res))


def write_compare(run_a: Path, run_b: Path, out: Path, overwrite: bool = False,
                  eval_dir: str = "eval") -> dict[str, Any]:
    """precision_compare.json / .md and loss_<stage>.png in `out`, written atomically."""
    res = compare(run_a, run_b, eval_dir)
    labels = (f"A {Path(run_a).name}", f"B {Path(run_b).name}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for stage in res["loss"]["stages"]:
            plot_loss(stage, labels, tmp / f"loss_{stage['stage']}.png")
        (tmp / "precision_compare.json").write_text(json.dumps(res, indent=1) + "\n")
        (tmp / "precision_compare.md").write_text(render_markdown(res))
    return res


def summary(res: dict) -> str:
    sc, vt, j, loss = res["scores"], res["comparisons"], res["judge"]["all"], res["loss"]["stages"]
    worst = max((s["max_abs_diff"] or 0.0 for s in loss), default=None)
    return (f"scores: B − A excludes 0 in {len(sc.get('moved', []))} of {sc.get('n_cells', 0)} cells; "
            f"verdicts that differ: {len(vt['differ'])} of {vt['n']}; loss: {len(loss)} stage(s), "
            f"max abs(A − B) {_num(worst)}; same judged outcome: {_pct(j['same_outcome'])} of "
            f"{j['n_judged']}; byte-identical generations: {_pct(j['identical_generations'])} of "
            f"{j['n_generations']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="run dir A (fp32)")
    parser.add_argument("run_b", type=Path, help="run dir B (bf16), same config but the precision keys")
    parser.add_argument("--out", type=Path, required=True, help="output dir (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    parser.add_argument("--eval-dir", default="eval",
                        help="the folder holding report.json inside each run dir (default: eval)")
    args = parser.parse_args(argv)
    try:
        res = write_compare(args.run_a, args.run_b, args.out, args.overwrite, args.eval_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"precision_compare: error: {exc}", file=sys.stderr)
        return 2
    print(summary(res))
    print(f"wrote {args.out / 'precision_compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-dimension [0, 1] scores with paired bootstrap intervals, the fused model's comparisons,
and report.md / scores.png.

Score of a dimension = the first of its registered `score_metrics` (pipeline.dimensions,
each a pipeline.eval.score_metrics entry) that every evaluated model has. Intervals and
differences come from one group-clustered, stratified bootstrap shared by all models
(pipeline.eval.bootstrap.paired_bootstrap); see docs/evaluation.md. Raw metrics in other units
(log-likelihoods in nats, rates) stay in the per-task tables and never enter a score or a mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.dimensions import get_dimension

from .bootstrap import LEVEL, N_BOOT, SEED, PairedBootstrap, make_design, paired_bootstrap, verdict
from .cost import cost_lines
from .judge_report import judge_lines, outcome_lines
from .ll_gain import ll_gain_lines, ll_gain_report
from .routing import routing_lines
from .score_metrics import ItemScores, get_score_metric

# metric columns shown in the per-task tables, in order (the judged outcome rates have their own
# table: judge_report.outcome_lines)
METRIC_COLUMNS = ("mc1", "mc2", "mc1_harness", "mc2_harness", "pref_acc", "exact_match",
                  "ref_mean_ll", "rejected_mean_ll", "flagged_rate")
BASE = "base"


def item_layout(items: dict[str, list[dict]]) -> dict[str, dict[str, list]]:
    """task -> {"group": [...], "kind": [...]} of the evaluated rows, in order."""
    return {task: {"group": [r["group"] for r in rows], "kind": [r["kind"] for r in rows]}
            for task, rows in items.items()}


def _per_item(metrics: dict, model: str, task: str, n: int) -> dict:
    task_metrics = metrics[model].get(task)
    if task_metrics is None or "per_item" not in task_metrics:
        raise ValueError(f"metrics of model {model!r} on task {task!r} lack 'per_item' (per-item "
                         f"values are needed for intervals)")
    for key, values in task_metrics["per_item"].items():
        if len(values) != n:
            raise ValueError(f"metrics[{model!r}][{task!r}]['per_item'][{key!r}] has {len(values)} "
                             f"values for the task's {n} items")
    return task_metrics["per_item"]


def _same_items(scored: dict[str, ItemScores], task: str, name: str) -> None:
    first, ref = next(iter(scored.items()))
    for model, s in scored.items():
        if s.strata != ref.strata:
            raise ValueError(f"score metric {name!r} on task {task!r}: model {model!r} is scored on "
                             f"other items than {first!r} (paired comparisons need the same items)")


def score_candidates(dim: str, overrides: Optional[dict] = None) -> Sequence[str]:
    """The score metrics to try for `dim`, in order: `overrides[dim]` (eval.score_metrics) if
    given, else the dimension's registered score_metrics."""
    return (overrides or {}).get(dim) or get_dimension(dim).score_metrics


def choose_score_metrics(metrics: dict[str, dict], layout: dict[str, dict],
                         dimensions: Sequence[str], overrides: Optional[dict] = None
                         ) -> dict[str, tuple[Optional[str], dict]]:
    """dimension -> (score metric name, {model: ItemScores}), or (None, {}) if no candidate is
    available for every model (candidates: `score_candidates`)."""
    chosen: dict[str, tuple[Optional[str], dict]] = {}
    for dim in dimensions:
        kinds = layout[dim]["kind"]
        per_item = {m: _per_item(metrics, m, dim, len(kinds)) for m in metrics}
        base = per_item.get(BASE)
        chosen[dim] = (None, {})
        for name in score_candidates(dim, overrides):
            metric = get_score_metric(name)
            scored = {m: metric.score_items(p, base, kinds) for m, p in per_item.items()}
            if scored and all(s.available() for s in scored.values()):
                _same_items(scored, dim, name)
                chosen[dim] = (name, scored)
                break
    return chosen


def interval_dict(iv) -> dict[str, Any]:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high,
            "n_groups": iv.n_groups, "n_items": iv.n_items}


def paired_comparison(pb: PairedBootstrap, a: str, b: str, dim: str) -> dict[str, Any]:
    iv = pb.difference(a, b, dim)
    other = pb.interval(b, dim).estimate
    return {"diff": iv.estimate, "low": iv.low, "high": iv.high, "verdict": verdict(iv),
            # the paper's relative gain: 100 * (a - b) / b
            "rel_pct": 100.0 * iv.estimate / other if other else None,
            "n_groups": iv.n_groups, "n_items": iv.n_items}


def score_report(metrics: dict[str, dict], layout: dict[str, dict], fused: str, *,
                 n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL,
                 score_metrics: Optional[dict] = None) -> dict[str, Any]:
    """The report's score keys: score_metrics, scores (floats), score_intervals, comparisons
    (fused vs every other model), expert_vs_base (each expert vs base on its own dimension),
    ll_gain (pipeline.eval.ll_gain), bootstrap (its settings and how many groups are shared)."""
    dims = list(layout)
    chosen = choose_score_metrics(metrics, layout, dims, score_metrics)
    models = list(metrics)
    scored = [d for d in dims if chosen[d][0] is not None]
    out: dict[str, Any] = {
        "score_metrics": {d: None if chosen[d][0] is None else f"{d}/{chosen[d][0]}" for d in dims},
        "scores": {m: {**{d: None for d in dims}, "mean": None} for m in models},
        "score_intervals": {m: {} for m in models}, "comparisons": {}, "expert_vs_base": {},
        "ll_gain": {},
        "bootstrap": {"n_boot": n_boot, "level": level, "seed": seed,
                      "resampled": "groups (eval column `group`) within strata, paired across "
                                   "models; the mean draws a group shared by several dimensions "
                                   "once for all of them", "shared_groups": 0}}
    if not scored:
        return out
    designs = {d: make_design(layout[d]["group"], next(iter(chosen[d][1].values())).strata)
               for d in scored}
    values = {d: {m: chosen[d][1][m].values for m in models} for d in scored}
    pb = paired_bootstrap(values, designs, n_boot=n_boot, seed=seed, level=level)
    out["bootstrap"]["shared_groups"] = pb.joint.n_shared
    out["ll_gain"] = ll_gain_report(metrics, layout, chosen, n_boot=n_boot, seed=seed, level=level)
    for m in models:
        for d in scored + ["mean"]:
            iv = pb.interval(m, d)
            out["scores"][m][d] = iv.estimate
            out["score_intervals"][m][d] = interval_dict(iv)
    if fused in models:
        out["comparisons"] = {o: {d: paired_comparison(pb, fused, o, d) for d in scored + ["mean"]}
                              for o in models if o != fused}
    if BASE in models:
        out["expert_vs_base"] = {d: {"expert": d, **paired_comparison(pb, d, BASE, d)}
                                 for d in scored if d in models and d != BASE}
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _cell(iv: Optional[dict], signed: bool = False) -> str:
    if not iv:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    est = iv["estimate"] if "estimate" in iv else iv["diff"]
    return f"{f.format(est)} [{f.format(iv['low'])}, {f.format(iv['high'])}]"


def _score_lines(report: dict) -> list[str]:
    chosen, intervals = report["score_metrics"], report["score_intervals"]
    dims = list(chosen)
    boot = report["bootstrap"]
    lines = [f"## Scores per dimension ({boot['level']:.0%} interval)", "",
             "Score metrics ([0, 1], higher is better): "
             + ", ".join(f"{d} = `{chosen[d]}`" for d in dims)
             + f"; mean = mean over the scored dimensions. Intervals: percentile bootstrap "
               f"({boot['n_boot']} resamples) over question groups within strata, paired across models"
             + (f"; the mean's resamples draw each of the {boot['shared_groups']} prompts scored in "
                f"several dimensions once for all of them." if boot.get("shared_groups") else "."), ""]
    rows = [[m] + [_cell(intervals[m].get(d)) for d in dims + ["mean"]] for m in report["scores"]]
    return lines + _table(["model"] + dims + ["mean"], rows)


def _comparison_lines(report: dict) -> list[str]:
    if not report["comparisons"]:
        return []
    lines = ["", f"## `{report['fused_model']}` vs every other model (paired difference)", "",
             "verdict: holds = the whole interval is above 0, fails = wholly below 0, tie = it "
             "contains 0; rel % = 100 (fused − other) / other.", ""]
    rows = [[other, dim, _cell(c, signed=True), c["verdict"],
             "–" if c["rel_pct"] is None else f"{c['rel_pct']:+.1f} %"]
            for other, per_dim in report["comparisons"].items() for dim, c in per_dim.items()]
    return lines + _table(["other model", "dimension", "fused − other [interval]", "verdict", "rel %"], rows)


def render_markdown(report: dict) -> str:
    results = report["metrics"]
    lines = ["# H3Fusion evaluation report", "",
             f"Eval split: `{report['split']}`; models: {', '.join(results)}.", "",
             *judge_lines(report)]
    chat = [m for m, f in (report.get("prompt_formats") or {}).items() if f != "alpaca"]
    if chat:   # pipeline.eval.prompts
        lines += [f"Prompt format: {', '.join(f'{m} = its own chat template' for m in chat)}; every "
                  f"other model the Alpaca template.", ""]
    reused = report.get("reused_from") or {}
    if reused:   # eval.reuse_from: say which results this evaluation did not compute itself
        by_dir: dict[str, list[str]] = {}
        for n, r in reused.items():
            by_dir.setdefault(r["report_dir"], []).append(n if r["model"] == n else f"{n} (as {r['model']})")
        where = "; of ".join(f"{', '.join(names)} taken from {d}" for d, names in by_dir.items())
        lines += [f"Results of {where} (same weights, items and per-model settings; "
                  f"eval.reuse_from).", ""]
    for task in report["score_metrics"]:
        cols = [c for c in METRIC_COLUMNS if any(r.get(task, {}).get(c) is not None for r in results.values())]
        lines += [f"## {task} (raw metrics; log-likelihoods in nats per token)", ""]
        lines += _table(["model"] + cols + ["items"],
                        [[m] + [r[task].get(c) for c in cols] + [r[task].get("n_items")]
                         for m, r in results.items() if task in r]) + [""]
    lines += outcome_lines(report)
    lines += _score_lines(report) + ll_gain_lines(report) + cost_lines(report) + _comparison_lines(report)
    lines += routing_lines(report.get("routing_confusion"), report["split"])
    return "\n".join(lines) + "\n"


# scores.png: ten colours, then the same ten hatched: 40 distinct bar styles before any repeats
BAR_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")
BAR_HATCHES = ("", "//", "..", "xx")
FUSED_COLOUR = "#000000"


@dataclass(frozen=True)
class BarStyle:
    color: str
    hatch: str = ""
    edgecolor: str = "white"
    linewidth: float = 0.5


def bar_styles(models: Sequence[str], fused: Optional[str] = None) -> dict[str, BarStyle]:
    """One bar style per model, fixed by the sorted names (a model keeps its style whatever
    order the report lists the models in): colour i % 10 with hatch i // 10; distinct for up to
    40 models besides `fused`, which is solid black with a thick edge (no other model is black)."""
    others = sorted(m for m in models if m != fused)
    styles = {m: BarStyle(BAR_COLOURS[i % len(BAR_COLOURS)],
                          BAR_HATCHES[i // len(BAR_COLOURS) % len(BAR_HATCHES)])
              for i, m in enumerate(others)}
    if fused in models:
        styles[fused] = BarStyle(FUSED_COLOUR, "", edgecolor="#ffd700", linewidth=2.0)
    return styles


def plot_order(models: Sequence[str], fused: Optional[str] = None) -> list[str]:
    """The report's model order with the fused model last (its bar drawn last, rightmost)."""
    return [m for m in models if m != fused] + [m for m in models if m == fused]


def plot_scores(scores: dict[str, dict], path: Path, intervals: Optional[dict] = None,
                fused: Optional[str] = None) -> None:
    """Grouped bar chart: one group per dimension (+ mean), one bar per model (bar_styles),
    interval whiskers; the fused model's bars last, outlined and labelled with their value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = plot_order(list(scores), fused)
    styles = bar_styles(models, fused)
    groups = [g for g in next(iter(scores.values()), {}) if g != "mean"] + ["mean"]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.35 * len(groups) * len(models)), 4))
    for j, model in enumerate(models):
        values = [scores[model][g] if scores[model][g] is not None else 0.0 for g in groups]
        ivs = [(intervals or {}).get(model, {}).get(g) for g in groups]
        err = [[v - iv["low"] if iv else 0.0 for v, iv in zip(values, ivs)],
               [iv["high"] - v if iv else 0.0 for v, iv in zip(values, ivs)]]
        st = styles[model]
        xs = [i + j * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=f"{model} (H3Fusion)" if model == fused else model,
                      color=st.color, hatch=st.hatch, edgecolor=st.edgecolor, linewidth=st.linewidth,
                      yerr=err if intervals else None, capsize=2, error_kw={"ecolor": "#555555"})
        if model == fused:
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small", fontweight="bold", padding=2)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("score [0, 1]")
    ax.set_title("HHH score per dimension (95 % bootstrap intervals)")
    # beside the axes, not over the bars
    ax.legend(fontsize="small", ncol=1 + len(models) // 16, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Per-dimension scores, the fused model's gain over the best expert, and report.md/json/png.

Score of a dimension = the first metric of its registered `score_metrics`
(pipeline.data.dimensions) that every evaluated model has (so all models are compared on the
same number); see docs/evaluation.md. The dimensions are the evaluated data's, in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.data.dimensions import get_dimension
# metric columns shown in the report, in order
METRIC_COLUMNS = ("mc1", "mc2", "mc1_harness", "mc2_harness", "pref_acc", "refusal_rate", "exact_match",
                  "ref_mean_ll", "rejected_mean_ll", "flagged_rate")


def choose_score_metrics(results: dict[str, dict], dimensions: Sequence[str]) -> dict[str, Optional[str]]:
    """dimension -> 'task/metric' used as its score, or None if no candidate is measured."""
    chosen: dict[str, Optional[str]] = {}
    for dim in dimensions:
        chosen[dim] = None
        for metric in get_dimension(dim).score_metrics:
            if results and all(r.get(dim, {}).get(metric) is not None for r in results.values()):
                chosen[dim] = f"{dim}/{metric}"
                break
    return chosen


def dimension_scores(results: dict[str, dict], chosen: dict[str, Optional[str]]) -> dict[str, dict]:
    """model -> {dim: score, 'mean': mean over the dimensions that have a score}."""
    scores = {}
    for model, per_task in results.items():
        row: dict[str, Any] = {}
        for dim, key in chosen.items():
            row[dim] = None if key is None else per_task[dim][key.split("/", 1)[1]]
        measured = [v for v in row.values() if v is not None]
        row["mean"] = sum(measured) / len(measured) if measured else None
        scores[model] = row
    return scores


def _gain(fused: float, best: float) -> dict[str, Any]:
    return {"abs": fused - best, "rel_pct": 100.0 * (fused - best) / abs(best) if best else None}


def fused_gains(scores: dict[str, dict], fused: str, tolerance: float) -> dict[str, dict]:
    """Per dimension (and the mean): fused score vs the best single expert and best other model.

    `rel_pct` = 100 * (fused - best_expert) / |best_expert|, the relative gain the paper
    reports. Experts are the models named after a dimension (helpful, harmless, honest, ...).
    """
    if fused not in scores:
        return {}
    dims = [d for d in scores[fused] if d != "mean"]
    experts = [m for m in scores if m in dims]
    others = [m for m in scores if m != fused]
    gains = {}
    for dim in dims + ["mean"]:
        f = scores[fused][dim]
        if f is None:
            continue
        entry: dict[str, Any] = {"fused": f}
        for label, pool in (("best_expert", experts), ("best_other", others)):
            valid = [m for m in pool if scores[m][dim] is not None]
            if valid:
                best = max(valid, key=lambda m: scores[m][dim])
                entry[label] = best
                entry[f"{label}_score"] = scores[best][dim]
                entry[f"vs_{label}"] = _gain(f, scores[best][dim])
        if "best_expert_score" in entry:
            entry["at_least_best_expert"] = f >= entry["best_expert_score"] - tolerance
        gains[dim] = entry
    return gains


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def render_markdown(report: dict) -> str:
    results, scores, chosen = report["metrics"], report["scores"], report["score_metrics"]
    lines = ["# H3Fusion evaluation report", "",
             f"Eval split: `{report['split']}`; models: {', '.join(results)}.", ""]
    dims = list(chosen)
    for task in dims:
        cols = [c for c in METRIC_COLUMNS if any(r.get(task, {}).get(c) is not None for r in results.values())]
        lines += [f"## {task}", ""]
        lines += _table(["model"] + cols + ["items"],
                        [[m] + [r[task].get(c) for c in cols] + [r[task].get("n_items")]
                         for m, r in results.items() if task in r]) + [""]
    lines += ["## Scores per dimension", "",
              "Score metrics: " + ", ".join(f"{d} = `{chosen[d]}`" for d in dims) + "; mean = mean over dimensions.", ""]
    lines += _table(["model"] + dims + ["mean"], [[m] + [s[d] for d in dims + ["mean"]] for m, s in scores.items()])
    if report["fused_gain"]:
        lines += ["", f"## `{report['fused_model']}` vs the best single expert", ""]
        rows = [[d, g["fused"], g.get("best_expert"), g.get("best_expert_score"),
                 g.get("vs_best_expert", {}).get("abs"), g.get("vs_best_expert", {}).get("rel_pct"),
                 g.get("at_least_best_expert")] for d, g in report["fused_gain"].items()]
        lines += _table(["dimension", "fused", "best expert", "expert score", "gain", "gain %",
                         f"≥ best − {report['tolerance']}"], rows)
    return "\n".join(lines) + "\n"


def plot_scores(scores: dict[str, dict], path: Path) -> None:
    """Grouped bar chart: one group per dimension (+ mean), one bar per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    groups = [g for g in next(iter(scores.values()), {}) if g != "mean"] + ["mean"]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.35 * len(groups) * len(models)), 4))
    for j, model in enumerate(models):
        values = [scores[model][g] if scores[model][g] is not None else 0.0 for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=model)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("score")
    ax.set_title("HHH score per dimension")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The fusion sweep's table (tools/sweep/fusion_sweep.py): points ranked by dev mean, rendered as
sweep.json / sweep.md. Pure functions over the points' result records, tested without training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.io_utils import write_json

NOTE = ("Choosing the point with the highest dev mean is itself a selection: over several points "
        "the best dev mean is biased upward (the largest of noisy estimates), and points whose dev "
        "intervals overlap are not shown to differ (these are per-point intervals, not a paired "
        "comparison). Put the chosen settings into the config and take the final number from the "
        "test split, evaluated once by `h3fusion run` with those settings; never choose between "
        "points on test.")


def as_overrides(point: dict[str, Any]) -> list[str]:
    """`--set` strings; JSON is valid YAML, so each value parses back as itself."""
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def overrides_text(point: dict[str, Any]) -> str:
    return ", ".join(as_overrides(point)) or "(the config as is)"


def _rank_key(result: dict) -> tuple:
    mean = (result.get("scores") or {}).get("mean")
    ok = result.get("status") == "ok" and mean is not None
    return (not ok, -(mean if ok else 0.0), result.get("id", ""))


def summarize(results: list[dict], run_dir: str = "", split: str = "dev") -> dict:
    """The sweep table: points by dev mean (failed last), best point, score metrics per dim."""
    rows = sorted(results, key=_rank_key)
    dims = []
    metrics: dict[str, set] = {}
    for r in rows:
        dims += [d for d in r.get("dimensions") or r.get("score_metrics") or () if d not in dims]
        for dim, metric in (r.get("score_metrics") or {}).items():
            metrics.setdefault(dim, set()).add(metric)
    best = next((r for r in rows if _rank_key(r)[0] is False), None)
    tied = [r["id"] for r in rows if best and r is not best and _rank_key(r)[:2] == _rank_key(best)[:2]]
    mixed = {d: sorted(map(str, m)) for d, m in metrics.items() if len(m) > 1}
    return {"split": split, "run_dir": run_dir, "dimensions": dims, "points": rows,
            "score_metrics": {d: sorted(map(str, m))[0] if len(m) == 1 else None for d, m in metrics.items()},
            "mixed_score_metrics": mixed, "best": best["id"] if best else None,
            "tied_with_best": tied, "note": NOTE}


def score_cell(result: dict, key: str) -> str:
    value = (result.get("scores") or {}).get(key)
    if value is None:
        return "-"
    iv = (result.get("intervals") or {}).get(key)
    if iv and iv.get("low") is not None and iv.get("high") is not None:
        return f"{value:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
    return f"{value:.3f}"


def point_status(result: dict) -> str:
    if result.get("status") == "ok":
        return "ok"
    why = f" ({result['error']})" if result.get("error") else ""
    return f"failed: {result.get('failed_stage')} exit {result.get('returncode')}{why}, log {result.get('log')}"


def render_markdown(summary: dict) -> str:
    dims, rows = summary["dimensions"], summary["points"]
    ok = sum(r.get("status") == "ok" for r in rows)
    lines = [f"# Fusion sweep on the {summary['split']} split", "",
             f"run: `{summary['run_dir']}`; {len(rows)} points, {ok} ok, {len(rows) - ok} failed. "
             f"Scores: the fused model only, on {summary['split']}; [low, high] = 95% interval "
             f"of that score when the report has one.", ""]
    if summary["score_metrics"]:
        lines += ["score metric per dimension: " + ", ".join(
            f"{d} = {m or 'mixed'}" for d, m in summary["score_metrics"].items()), ""]
    for dim, names in summary["mixed_score_metrics"].items():
        lines += [f"**Warning:** dimension {dim} was scored with different metrics {names} across "
                  f"points: its column and the mean do not compare across those points.", ""]
    header = ["rank", "point", "overrides", *dims, "mean", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.get("id", "?"), overrides_text(r.get("overrides") or {}),
                 *[score_cell(r, d) for d in dims], score_cell(r, "mean"), point_status(r)]
        lines.append("| " + " | ".join(cells) + " |")
    best = next((r for r in rows if r.get("id") == summary["best"]), None)
    lines += ["", f"**best on {summary['split']}:** " + (
        f"point {best['id']} ({overrides_text(best['overrides'])}), mean {score_cell(best, 'mean')}"
        if best else "none (no point finished with a score)")
        + (f"; tied on dev mean with {', '.join(summary['tied_with_best'])}" if summary["tied_with_best"] else ""),
        "", summary["note"], ""]
    return "\n".join(lines)


def write_summary(out: Path, results: list[dict], run_dir: str) -> dict:
    summary = summarize(results, run_dir)
    write_json(out / "sweep.json", summary)
    tmp = out / "sweep.md.tmp"
    tmp.write_text(render_markdown(summary))
    tmp.replace(out / "sweep.md")
    return summary

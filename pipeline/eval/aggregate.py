"""Several runs of the same config with different training seeds -> mean ± sd across seeds.

`h3fusion run --seed N` changes only the training (and eval sampling/bootstrap) seeds; the
data seeds stay, so every run evaluates the same test items. `aggregate_runs` checks that (same
split, same tasks, same group and kind per item, same score metrics, same models) and then
summarises each model's score per dimension and mean (bootstrap.across_seeds: mean, sample sd),
the fused model's paired differences (mean ± sd of the per-seed differences, and each seed's
verdict) and, where `<run>/claims.json` exists, each claim's per-seed result. The spread across
seeds is the training variance the per-run bootstrap intervals (item sampling) do not include.

`seeds_x_items` (the headline): every model's score and every fused − other difference with one
interval over seeds AND items (bootstrap.crossed_bootstrap: a resample draws the runs with
replacement, as clusters, and the item groups once for all drawn runs), next to its sd across
the runs. With few runs the seed part of that interval is coarse (3 runs: 10 distinct draws).

`pooled`: every model's per-item score averaged over the runs (the items are the same), then the
report's own paired bootstrap over items on those averages -- so "fused − other, averaged over
seeds" gets one interval and one verdict, the per-seed verdicts stay beside it. Each run's
training seeds (expert, fusion) come from its resolved_config.yaml, so a table whose experts are
shared between runs says so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.io_utils import atomic_dir

from .bootstrap import across_seeds, crossed_bootstrap, make_design, paired_bootstrap
from .report import choose_score_metrics, interval_dict, paired_comparison


def load_run(run_dir: Path) -> dict[str, Any]:
    """report.json (required) and claims.json (optional) of one run dir."""
    path = Path(run_dir) / "eval" / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"aggregate: {path} not found (the run's evaluate stage must finish)")
    report = json.loads(path.read_text())
    for key in ("items", "scores", "score_metrics", "split"):
        if key not in report:
            raise ValueError(f"aggregate: {path} lacks {key!r} (made by an older `h3fusion evaluate`; "
                             f"rerun it)")
    claims = Path(run_dir) / "claims.json"
    return {"dir": str(run_dir), "report": report,
            "claims": json.loads(claims.read_text()) if claims.is_file() else None}


def check_same_items(runs: Sequence[dict]) -> None:
    """Every run evaluated the same items with the same metrics and models, else one error
    naming the run (and the task)."""
    first = runs[0]
    ref = first["report"]
    for run in runs[1:]:
        rep, name = run["report"], run["dir"]
        if rep["split"] != ref["split"]:
            raise ValueError(f"aggregate: run {name} evaluated split {rep['split']!r}, {first['dir']} "
                             f"split {ref['split']!r}")
        if list(rep["items"]) != list(ref["items"]):
            raise ValueError(f"aggregate: run {name} has tasks {list(rep['items'])}, {first['dir']} "
                             f"has {list(ref['items'])}")
        for task, layout in ref["items"].items():
            if rep["items"][task] != layout:
                raise ValueError(f"aggregate: run {name}, task {task!r}: other eval items (group/kind "
                                 f"lists differ from {first['dir']}); seeds must share the data split")
            if rep["score_metrics"].get(task) != ref["score_metrics"].get(task):
                raise ValueError(f"aggregate: run {name}, task {task!r}: score metric "
                                 f"{rep['score_metrics'].get(task)!r}, {first['dir']} has "
                                 f"{ref['score_metrics'].get(task)!r}")
        if list(rep["scores"]) != list(ref["scores"]):
            raise ValueError(f"aggregate: run {name} has models {list(rep['scores'])}, {first['dir']} "
                             f"has {list(ref['scores'])}")


def _summary(values: list[Optional[float]]) -> Optional[dict]:
    if any(v is None for v in values):
        return None
    return {**across_seeds(values).to_dict(), "per_seed": values}


def _comparisons(reports: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for other, per_dim in reports[0].get("comparisons", {}).items():
        out[other] = {}
        for dim in per_dim:
            entries = [r["comparisons"][other][dim] for r in reports]
            verdicts = [e["verdict"] for e in entries]
            out[other][dim] = {"diff": _summary([e["diff"] for e in entries]), "verdicts": verdicts,
                               "counts": {v: verdicts.count(v) for v in ("holds", "tie", "fails")}}
    return out


def _claims(runs: Sequence[dict]) -> dict[str, dict]:
    """claim name -> per-seed passed / verdict (None for a run without claims.json)."""
    names = list(dict.fromkeys(c["name"] for r in runs if r["claims"] for c in r["claims"]["claims"]))
    out = {}
    for name in names:
        per_run = [next((c for c in r["claims"]["claims"] if c["name"] == name), None)
                   if r["claims"] else None for r in runs]
        out[name] = {"passed": [None if c is None else c["passed"] for c in per_run],
                     "verdicts": [None if c is None else c.get("verdict") for c in per_run]}
    return out


def _per_seed_values(reports: list[dict], dirs: list[str]) -> tuple[list[dict], dict]:
    """Per run: dimension -> model -> per-item score values, each run's scores chosen as its own
    report chose them (check_same_items made them agree); and dimension -> Design, which must be
    the same in every run (the same items scored), else one error naming the run."""
    layout = reports[0]["items"]
    chosen = [choose_score_metrics(r["metrics"], layout, list(layout),
                                   (r.get("config") or {}).get("score_metrics")) for r in reports]
    per_seed: list[dict] = [{} for _ in reports]
    designs = {}
    for dim in layout:
        if chosen[0][dim][0] is None:
            continue
        for s, c in enumerate(chosen):
            design = make_design(layout[dim]["group"], next(iter(c[dim][1].values())).strata)
            if designs.setdefault(dim, design) != design:
                raise ValueError(f"aggregate: run {dirs[s]}, task {dim!r}: other scored items than "
                                 f"{dirs[0]} (the score metric's strata differ)")
            per_seed[s][dim] = {m: v.values for m, v in c[dim][1].items()}
    return per_seed, designs


def _seed_averaged_values(per_seed: list[dict]) -> dict:
    """dimension -> model -> per-item score averaged over the runs (None where unscored)."""
    return {dim: {m: [None if any(v is None for v in vs) else sum(vs) / len(vs)
                      for vs in zip(*(run[dim][m] for run in per_seed))] for m in models}
            for dim, models in per_seed[0].items()}


def pooled_over_seeds(reports: list[dict], per_seed: list[dict], designs: dict
                      ) -> Optional[dict[str, Any]]:
    """Scores and fused − other comparisons of the seed-averaged per-item scores (module
    docstring), bootstrap settings from the first run's report; None if no dimension is scored
    (`per_seed`, `designs`: _per_seed_values)."""
    if not designs:
        return None
    boot = reports[0]["bootstrap"]
    pb = paired_bootstrap(_seed_averaged_values(per_seed), designs, n_boot=boot["n_boot"],
                          seed=boot["seed"], level=boot["level"])
    rows = list(designs) + ["mean"]
    fused = reports[0].get("fused_model")
    return {"scores": {m: {d: interval_dict(pb.interval(m, d)) for d in rows} for m in pb.models},
            "comparisons": {o: {d: paired_comparison(pb, fused, o, d) for d in rows}
                            for o in pb.models if o != fused} if fused in pb.models else {},
            "bootstrap": boot}


def _sd(values: list[float]) -> Optional[float]:
    return across_seeds(values).sd


def seeds_by_items(reports: list[dict], per_seed: list[dict], designs: dict
                   ) -> Optional[dict[str, Any]]:
    """Every model's score and every fused − other difference with an interval over seeds AND
    items (bootstrap.crossed_bootstrap: runs resampled as clusters, item groups drawn once for
    all drawn runs), each beside its sd across the runs; None as for `pooled_over_seeds`."""
    if not designs:
        return None
    boot = reports[0]["bootstrap"]
    pb = crossed_bootstrap(per_seed, designs, n_boot=boot["n_boot"], seed=boot["seed"],
                           level=boot["level"])
    rows, fused = list(designs) + ["mean"], reports[0].get("fused_model")
    per_run = [r["scores"] for r in reports]   # each run's own estimates: their sd across runs
    out = {"scores": {m: {d: {**interval_dict(pb.interval(m, d)),
                              "sd_seeds": _sd([s[m][d] for s in per_run])} for d in rows}
                      for m in pb.models}, "comparisons": {}}
    if fused in pb.models:
        out["comparisons"] = {o: {d: {**paired_comparison(pb, fused, o, d), "sd_seeds": _sd(
            [s[fused][d] - s[o][d] for s in per_run])} for d in rows}
            for o in pb.models if o != fused}
    out["bootstrap"] = {"n_boot": boot["n_boot"], "level": boot["level"], "seed": boot["seed"],
                        "n_seeds": len(reports),
                        "resampled": "runs (seeds) with replacement as clusters, and the item "
                                     "groups as each report's bootstrap draws them, one draw "
                                     "applied to every drawn run; paired across models"}
    return out


def training_seeds(run_dir: Path) -> Optional[dict[str, Any]]:
    """expert.train.seed and fusion.train.seed of a run (its resolved_config.yaml), else None."""
    path = Path(run_dir) / "resolved_config.yaml"
    if not path.is_file():
        return None
    import yaml
    cfg = yaml.safe_load(path.read_text())
    return {stage: (cfg.get(stage) or {}).get("train", {}).get("seed") for stage in ("expert", "fusion")}


def same_in_every_run(reports: list[dict]) -> list[str]:
    """Models evaluated on the same files in every run (equal `result_keys`, pipeline.eval.reuse):
    their sd across seeds is 0 by construction, not a finding. Empty for reports without keys."""
    keys = [r.get("result_keys") or {} for r in reports]
    return [m for m, k in keys[0].items() if k and all(other.get(m) == k for other in keys[1:])]


def aggregate_runs(run_dirs: Sequence[Path]) -> dict[str, Any]:
    dirs = [str(Path(d).resolve()) for d in run_dirs]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"aggregate: a run dir is given twice ({dirs})")
    if not dirs:
        raise ValueError("aggregate: no run dirs given")
    runs = [load_run(Path(d)) for d in run_dirs]
    check_same_items(runs)
    reports = [r["report"] for r in runs]
    ref = reports[0]
    scores = {m: {d: _summary([r["scores"][m][d] for r in reports]) for d in ref["scores"][m]}
              for m in ref["scores"]}
    # per-item values (absent from a hand-made or pre-bootstrap report.json): the seeds x items
    # bootstrap and the pooled one read them
    with_items = all("metrics" in r and "bootstrap" in r for r in reports)
    per_seed, designs = (_per_seed_values(reports, [r["dir"] for r in runs]) if with_items
                         else ([], {}))
    return {"runs": [r["dir"] for r in runs], "n_seeds": len(runs),
            "seeds": [(r.get("config") or {}).get("seed") for r in reports],
            "split": ref["split"], "score_metrics": ref["score_metrics"],
            "fused_model": ref.get("fused_model"), "scores": scores,
            "training_seeds": [training_seeds(Path(r["dir"])) for r in runs],
            "same_in_every_run": same_in_every_run(reports) if len(reports) > 1 else [],
            "comparisons": _comparisons(reports),
            "seeds_x_items": seeds_by_items(reports, per_seed, designs),
            "pooled": pooled_over_seeds(reports, per_seed, designs),
            "claims": _claims(runs)}


def _pm(s: Optional[dict]) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.3f}" + ("" if s["sd"] is None else f" ± {s['sd']:.3f}")


def _seeds_line(agg: dict) -> list[str]:
    """What the runs share: training seeds (from resolved configs) and models whose weights are
    the same in every run (from result keys)."""
    seeds, same, parts = agg.get("training_seeds") or [], agg.get("same_in_every_run") or [], []
    if seeds and all(s is not None for s in seeds):
        parts.append("Training seeds per run (expert, fusion): " + ", ".join(
            f"({s['expert']}, {s['fusion']})" for s in seeds) + ".")
        if len({s["expert"] for s in seeds}) == 1 and len(seeds) > 1:
            parts.append("The expert seed is the same in every run: the runs vary fusion (and what "
                         "is trained beside it), and the spread does not include stage 1's.")
    if same:
        parts.append("Evaluated on the same weights in every run (so sd 0 by construction): "
                     f"{', '.join(same)}.")
    return [" ".join(parts), ""] if parts else []


def _iv(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def _pooled_lines(agg: dict) -> list[str]:
    pooled = agg.get("pooled")
    if not pooled or not pooled["comparisons"]:
        return []
    dims = list(next(iter(pooled["comparisons"].values())))
    lines = ["", f"## `{agg['fused_model']}` − other on the per-item scores averaged over the "
             f"{agg['n_seeds']} runs (paired bootstrap over items, "
             f"{pooled['bootstrap']['n_boot']} resamples, 95 %)", "",
             "| other | " + " | ".join(dims) + " | verdict (mean) | gain (mean) |",
             "|" + "---|" * (len(dims) + 3)]
    for other, per in pooled["comparisons"].items():
        rel = per["mean"]["rel_pct"]
        lines.append(f"| {other} | " + " | ".join(_iv(per[d]) for d in dims) +
                     f" | {per['mean']['verdict']} | " + ("–" if rel is None else f"{rel:+.1f} %") + " |")
    return lines


def _with_sd(c: dict, key: str, signed: bool) -> str:
    f = "+.3f" if signed else ".3f"
    sd = "" if c["sd_seeds"] is None else f" (sd {c['sd_seeds']:.3f})"
    return f"{c[key]:{f}} [{c['low']:{f}}, {c['high']:{f}}]{sd}"


def _crossed_lines(agg: dict) -> list[str]:
    """The seeds x items section: every score and fused − other with an interval that holds
    the training seed's variance (`seeds_by_items`), each with its sd across the runs."""
    sx = agg.get("seeds_x_items")
    if not sx:
        return []
    boot, dims = sx["bootstrap"], list(next(iter(sx["scores"].values())))
    lines = ["", f"## Seeds × items: {boot['n_seeds']} runs, {boot['n_boot']} resamples "
             f"({100 * boot['level']:.0f} %)", "",
             "Each resample draws the runs with replacement (a run is one cluster: all its scores "
             "share one training) and the item groups once for all of them; cells: estimate "
             "[interval] (sd across the runs).", "",
             "| model | " + " | ".join(dims) + " |", "|" + "---|" * (len(dims) + 1)]
    lines += [f"| {m} | " + " | ".join(_with_sd(per[d], "estimate", False) for d in dims) + " |"
              for m, per in sx["scores"].items()]
    if sx["comparisons"]:
        lines += ["", f"`{agg['fused_model']}` − other, seeds × items:", "",
                  "| other | " + " | ".join(dims) + " | verdict (mean) |", "|" + "---|" * (len(dims) + 2)]
        lines += [f"| {o} | " + " | ".join(_with_sd(per[d], "diff", True) for d in dims) +
                  f" | {per['mean']['verdict']} |" for o, per in sx["comparisons"].items()]
    return lines


def render_aggregate_md(agg: dict) -> str:
    dims = list(next(iter(agg["scores"].values()), {}))
    lines = ["# H3Fusion results across seeds", "",
             f"{agg['n_seeds']} runs (eval seeds {agg['seeds']}), split `{agg['split']}`, same eval "
             f"items in every run. Cells: mean ± sd across seeds (sd: n-1).", "",
             *_seeds_line(agg),
             "| model | " + " | ".join(dims) + " |", "|" + "---|" * (len(dims) + 1)]
    lines += [f"| {m} | " + " | ".join(_pm(s[d]) for d in dims) + " |" for m, s in agg["scores"].items()]
    lines += _crossed_lines(agg)
    if agg["comparisons"]:
        lines += ["", f"## `{agg['fused_model']}` − other: paired difference across seeds", "",
                  "| other | dimension | diff mean ± sd | verdict per seed |", "|---|---|---|---|"]
        lines += [f"| {o} | {d} | {_pm(c['diff'])} | {', '.join(c['verdicts'])} |"
                  for o, per in agg["comparisons"].items() for d, c in per.items()]
    lines += _pooled_lines(agg)
    if agg["claims"]:
        lines += ["", "## Claims per seed", "", "| claim | passed per seed | verdict per seed |",
                  "|---|---|---|"]
        lines += [f"| {n} | {', '.join('–' if p is None else ('pass' if p else 'FAIL') for p in c['passed'])} "
                  f"| {', '.join(v or '–' for v in c['verdicts'])} |" for n, c in agg["claims"].items()]
    return "\n".join(lines) + "\n"


def write_aggregate(run_dirs: Sequence[Path], out: Path, overwrite: bool = False) -> dict:
    """aggregate.json + aggregate.md in `out`, written atomically; returns the aggregate."""
    agg = aggregate_runs(run_dirs)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "aggregate.json").write_text(json.dumps(agg, indent=2) + "\n")
        (tmp / "aggregate.md").write_text(render_aggregate_md(agg))
    return agg

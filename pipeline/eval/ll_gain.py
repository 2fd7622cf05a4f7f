"""Log-likelihood gain over the base, beside a win-rate score.

A dimension scored by a win rate against the base (`ref_win_vs_base`: per item 1 / 0.5 / 0 as
the model finds the reference more or less likely per token than the base does) says how often
a model beats the base, not by how much. For such a score metric (its registry entry names the
raw per-item value, `gain_key`: `ref_ll`, the reference's mean per-token log-likelihood) the
report adds, for every model, the mean over the scored items of (model − reference model)
`ref_ll` in nats per token, with a paired, group-clustered bootstrap interval
(pipeline.eval.bootstrap.paired_bootstrap over the score's own items and groups), against the
base and against `base_chat` (the base in its own chat template, pipeline.eval.prompts) when
the report has it: a fine-tune's gain over `base_chat` is what is left of its gain over `base`
once the base is prompted in its own format. Nats never enter the [0, 1] score table.
"""
from __future__ import annotations

from typing import Any, Optional

from .bootstrap import LEVEL, N_BOOT, SEED, make_design, paired_bootstrap, verdict
from .prompts import BASE_CHAT
from .score_metrics import get_score_metric

BASE = "base"
REFERENCES = (BASE, BASE_CHAT)     # the models every model's gain is measured against
LABELS = {BASE: "base", BASE_CHAT: "base (chat template)"}


def ll_gain_report(metrics: dict[str, dict], layout: dict[str, dict], chosen: dict[str, tuple],
                   *, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """dimension -> {"metric", "value", "unit", "mean_ll": {model: float}, "gain": {reference:
    {model: {gain, low, high, verdict, n_groups, n_items}}}} for each dimension whose chosen
    score metric has a gain_key (`chosen`: report.choose_score_metrics)."""
    models, out = list(metrics), {}
    refs = [r for r in REFERENCES if r in models]
    for dim, (name, scored) in chosen.items():
        key = get_score_metric(name).gain_key if name else None
        if key is None or not refs:
            continue
        # the score's own items (every model has the value there: _same_items checked the strata)
        design = make_design(layout[dim]["group"], next(iter(scored.values())).strata)
        values = {m: metrics[m][dim]["per_item"][key] for m in models}
        pb = paired_bootstrap({dim: values}, {dim: design}, n_boot=n_boot, seed=seed, level=level)
        gain = {}
        for ref in refs:
            gain[ref] = {}
            for m in models:
                if m != ref:
                    iv = pb.difference(m, ref, dim)
                    gain[ref][m] = {"gain": iv.estimate, "low": iv.low, "high": iv.high,
                                    "verdict": verdict(iv), "n_groups": iv.n_groups,
                                    "n_items": iv.n_items}
        out[dim] = {"metric": name, "value": key, "unit": "nats per token",
                    "mean_ll": {m: pb.interval(m, dim).estimate for m in models}, "gain": gain}
    return out


def _cell(g: Optional[dict]) -> str:
    return "–" if not g else f"{g['gain']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]"


def ll_gain_lines(report: dict) -> list[str]:
    """report.md's "log-likelihood gain" table per dimension (empty when the report has none)."""
    lines: list[str] = []
    level = report.get("bootstrap", {}).get("level", LEVEL)
    for dim, g in (report.get("ll_gain") or {}).items():
        refs = list(g["gain"])
        lines += ["", f"## {dim}: log-likelihood gain ({g['unit']}, {level:.0%} paired interval)", "",
                  f"Beside the win rate (`{g['metric']}`, the {dim} score: share of items on which "
                  f"the model finds the reference more likely per token than the base does): the "
                  f"mean over the same items of the model's `{g['value']}` minus the reference "
                  f"model's, paired bootstrap over the same groups. `{BASE_CHAT}` is the base "
                  f"prompted with its own chat template (every other model: the Alpaca template); "
                  f"a gain over it is what is left of a gain over `base` once the base gets its "
                  f"own format.", ""]
        header = ["model", "win rate vs base", f"mean {g['value']}"] + \
            [f"gain vs {LABELS.get(r, r)}" for r in refs]
        rows = [[m, _score(report, m, dim), f"{ll:.4f}"] + [_cell(g["gain"][r].get(m)) for r in refs]
                for m, ll in g["mean_ll"].items()]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _score(report: dict, model: str, dim: str) -> str:
    v = (report.get("scores") or {}).get(model, {}).get(dim)
    return "–" if v is None else f"{v:.3f}"

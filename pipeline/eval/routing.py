"""The ensembles' checks before any model loads, and the prompt router's routing on the
evaluated items: routing dimension x chosen expert counts.

An evaluated model dir is an ensemble when its config.json has `model_type` h3fusion_ensemble;
its `method` is looked up in pipeline.registry.ENSEMBLES (the evaluation reaches the ensemble
code only through that registry and the loaded model) and its hooks say what to check or report.

For every ensemble whose method reports its routing (`reports_routing`: the router), its choice
(from the ensemble dir, without loading the members) is made on the prompt of every item the
report scores, as the ensemble itself chooses: the item's Alpaca prompt, tokenized with the
ensemble's tokenizer, the window up to the response marker. Rows are the item's routing dimension
(`pipeline.data.eval_route`: its own dimension, a `benign_prompt` -> helpful), columns the expert
chosen. An item counts once per dimension whose eval set holds it, as the report scores it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..registry import ENSEMBLES
from .scoring import ENSEMBLE_MODEL_TYPE


def ensemble_methods(models: dict[str, Path]) -> dict[str, tuple[str, Any]]:
    """name -> (method name, its pipeline.registry.ENSEMBLES entry) of the evaluated ensembles;
    an unknown method is the registry's error naming the config file."""
    out = {}
    for name, path in models.items():
        config = Path(path) / "config.json"
        data = json.loads(config.read_text()) if config.is_file() else {}
        if data.get("model_type") == ENSEMBLE_MODEL_TYPE:
            method = data.get("method")
            out[name] = (method, ENSEMBLES.get(method, f"{config}: method"))
    return out


def per_prompt_ensembles(models: dict[str, Path]) -> dict[str, str]:
    """name -> method of the evaluated ensembles that pick one expert per prompt (router, oracle)."""
    return {n: m for n, (m, method) in ensemble_methods(models).items() if method.per_prompt}


def router_dirs(models: dict[str, Path]) -> dict[str, Path]:
    """The evaluated ensembles whose routing the report shows (`reports_routing`: the router)."""
    return {n: Path(models[n]) for n, (_, method) in ensemble_methods(models).items()
            if method.reports_routing}


def check_routed_formats(models: dict[str, Path], formats: dict[str, str], alpaca: str) -> None:
    """Before any model loads: a router or oracle ensemble finds its prompt by the Alpaca
    template's response marker, so it is evaluated in the Alpaca format only."""
    for name, method in per_prompt_ensembles(models).items():
        if formats.get(name, alpaca) != alpaca:
            raise ValueError(f"model {name!r}: the {method} ensemble picks its expert from the Alpaca "
                             f"prompt (up to its response marker); prompt format "
                             f"{formats[name]!r} is not supported for it")


def check_oracle_tables(models: dict[str, Path], items: dict[str, list[dict]],
                        tokenizer_dir: Optional[Path] = None) -> None:
    """Before any model loads: every ensemble's method checks the items (`check_items`; the
    oracle: its table holds every prompt the evaluation will show it, the items' Alpaca prompts
    and harness contexts, else its error naming the first missing prompt, e.g. `--data` is not
    the data the oracle was built from)."""
    for name, (_, method) in ensemble_methods(models).items():
        try:
            method.check_items(Path(models[name]), items, tokenizer_dir)
        except ValueError as exc:
            raise ValueError(f"model {name!r}: {exc}") from None


def confusion_table(routes: list[str], chosen: list[str], dims: list[str],
                    experts: list[str]) -> dict[str, Any]:
    """Counts per (routing dimension, chosen expert), and the share sent to the own expert."""
    counts = {d: {e: 0 for e in experts} for d in dims}
    for route, expert in zip(routes, chosen, strict=True):
        counts[route][expert] += 1
    rows = {d: sum(c.values()) for d, c in counts.items()}
    own = {d: (counts[d].get(d, 0) / rows[d] if rows[d] else None) for d in dims}
    hits = sum(counts[d].get(d, 0) for d in dims)
    return {"experts": experts, "counts": counts, "items": rows,
            "to_own_expert": {**own, "all": hits / len(routes) if routes else None}}


def router_confusion(ensemble_dir: Path, items: dict[str, list[dict]],
                     tokenizer_dir: Optional[Path] = None) -> dict[str, Any]:
    """`confusion_table` of the router in `ensemble_dir` over `items` (dimension -> eval items):
    its method's `route_items` hook chooses."""
    from pipeline.data import eval_route

    from .models import load_tokenizer

    config_file = Path(ensemble_dir) / "config.json"
    config = json.loads(config_file.read_text())
    method = ENSEMBLES.get(config.get("method"), f"{config_file}: method")
    tokenizer = load_tokenizer(ensemble_dir, tokenizer_dir)
    dims = list(items)
    flat = [it for rows in items.values() for it in rows]
    routes = [eval_route(it, dims) for it in flat]
    names = list(config["member_names"])
    chosen = method.route_items(Path(ensemble_dir), tokenizer, flat)
    table = confusion_table(routes, [names[i] for i in chosen], dims, names)
    return {"rows": "routing dimension (own; benign_prompt -> helpful)",
            "columns": "expert the router's classifier chooses from the prompt", **table}


def routing_confusion(models: dict[str, Path], items: dict[str, list[dict]],
                      tokenizer_dir: Optional[Path] = None) -> dict[str, dict]:
    """model name -> `router_confusion`, for every router ensemble in `models`."""
    return {name: router_confusion(path, items, tokenizer_dir) for name, path in router_dirs(models).items()}


def routing_lines(confusion: Optional[dict], split: str) -> list[str]:
    """report.md's section: one table per router ensemble."""
    lines: list[str] = []
    for name, t in (confusion or {}).items():
        experts = t["experts"]
        lines += ["", f"## `{name}`: expert chosen per `{split}` item", "",
                  "Rows: the item's routing dimension (its own; `benign_prompt` items -> helpful); "
                  "columns: the expert the router's classifier picks from the prompt. Every scored "
                  "item counts (a prompt in two dimensions' sets counts in each).", "",
                  "| routing dimension | " + " | ".join(experts) + " | items | to own expert |",
                  "|" + "---|" * (len(experts) + 3)]
        for dim, row in t["counts"].items():
            share = t["to_own_expert"][dim]
            lines.append(f"| {dim} | " + " | ".join(str(row[e]) for e in experts)
                         + f" | {t['items'][dim]} | {'–' if share is None else f'{share:.3f}'} |")
        total = sum(t["items"].values())
        overall = t["to_own_expert"]["all"]
        lines.append("| all | " + " | ".join(str(sum(r[e] for r in t["counts"].values())) for e in experts)
                     + f" | {total} | {'–' if overall is None else f'{overall:.3f}'} |")
    return lines

"""The prompt router's routing on the evaluated items: routing dimension x chosen expert counts.

For every router ensemble among the evaluated models (`model_type` h3fusion_ensemble, method
"router"), its classifier (in the ensemble dir) is run on the prompt of every item the report
scores, as the router itself chooses: the item's Alpaca prompt, tokenized with the ensemble's
tokenizer, the classifier's window up to the response marker (pipeline.ensemble.classifier). Rows
are the item's routing dimension (`pipeline.data.eval_route`: its own dimension, a
`benign_prompt` -> helpful), columns the expert chosen. An item counts once per dimension whose
eval set holds it, as the report scores it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

ROUTER_METHOD = "router"
_NO_LIMIT = 1 << 30   # the window is the prompt's end, whatever truncation keeps of its left


def per_prompt_ensembles(models: dict[str, Path]) -> dict[str, str]:
    """name -> method of the evaluated ensembles that pick one expert per prompt (router, oracle)."""
    import json

    from pipeline.ensemble.modeling import PER_PROMPT_METHODS

    out = {}
    for name, path in models.items():
        config = Path(path) / "config.json"
        data = json.loads(config.read_text()) if config.is_file() else {}
        if data.get("model_type") == "h3fusion_ensemble" and data.get("method") in PER_PROMPT_METHODS:
            out[name] = data["method"]
    return out


def router_dirs(models: dict[str, Path]) -> dict[str, Path]:
    """The evaluated models that are prompt-router ensembles."""
    return {n: Path(models[n]) for n, m in per_prompt_ensembles(models).items() if m == ROUTER_METHOD}


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
    """Before any model loads: every oracle ensemble's table holds every prompt the evaluation
    will show it (the items' Alpaca prompts and harness contexts); else the oracle's error
    naming the first missing prompt (e.g. `--data` is not the data the oracle was built from)."""
    from pipeline.ensemble.oracle import item_windows, load_oracle

    from .models import load_tokenizer

    for name, method in per_prompt_ensembles(models).items():
        if method != "oracle":
            continue
        oracle = load_oracle(Path(models[name]))
        tokenizer = load_tokenizer(Path(models[name]), tokenizer_dir)
        windows = [w for rows in items.values() for it in rows
                   for w in item_windows(tokenizer, oracle.marker, it, oracle.window)]
        try:
            oracle.choose(windows, tokenizer.decode)
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
    """`confusion_table` of the router in `ensemble_dir` over `items` (dimension -> eval items)."""
    from pipeline.data import eval_route
    from pipeline.data.template import encode_prompt_response, format_prompt
    from pipeline.ensemble.classifier import prompt_tokens
    from pipeline.ensemble.modeling import EnsembleConfig, load_classifier

    from .models import load_tokenizer

    config = EnsembleConfig.from_pretrained(ensemble_dir)
    clf = load_classifier(ensemble_dir)
    tokenizer = load_tokenizer(ensemble_dir, tokenizer_dir)
    dims, marker = list(items), list(config.response_marker_ids)
    windows, routes = [], []
    for rows in items.values():
        for it in rows:
            ids = encode_prompt_response(tokenizer, format_prompt(it["instruction"], it["input"]),
                                         None, _NO_LIMIT)[0]
            windows.append(prompt_tokens(ids, marker, config.prompt_window))
            routes.append(eval_route(it, dims))
    names = list(config.member_names)
    table = confusion_table(routes, [names[i] for i in clf.predict(windows)], dims, names)
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

"""Ensemble method "oracle" (pipeline.registry.ENSEMBLES), the oracle router: each eval prompt
goes to the expert of its own dimension (the ceiling of per-prompt expert selection;
docs/baselines.md). A per-prompt method like the router, but the member is looked up.

`h3fusion ensemble` (method "oracle") builds a table from the data stage's eval files, every split
and every dimension: prompt -> the dimension whose expert answers it (`pipeline.data.eval_route`:
its own dimension, a `benign_prompt` -> helpful). A prompt is keyed by what the router classifier
sees of it (`classifier.prompt_tokens`: the last `prompt_window` token ids up to the response
marker), so the ensemble stays a plain causal LM: it finds the prompt in the token ids it is given.
A prompt that occurs in several dimensions' eval sets (AlpacaEval prompts are helpful references
and harmless over-refusal checks), or whose items disagree, is a benign request -> helpful (an
error when the run has no helpful dimension). For the mc items the lm-evaluation-harness contexts
(eval.harness_mc) are keyed too, as `harness.encode_harness` builds them. The table is saved as
`oracle_routes.json`; a prompt that is not in it is one error naming it, never a default expert.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from ..data import BENIGN_ROUTE, eval_route
from .classifier import NO_LIMIT, PROMPT_WINDOW, item_prompt_window, prompt_tokens
from .method import EnsembleBuild, RoutingMethod

ORACLE_FILE = "oracle_routes.json"


def item_windows(tokenizer, marker: list[int], item: dict,
                 window: int = PROMPT_WINDOW) -> Iterator[tuple[int, ...]]:
    """The windows the evaluation's requests of `item` show the router: its Alpaca prompt, and
    for an mc item the harness context of each option."""
    from pipeline.eval.harness import encode_harness, harness_context

    yield tuple(item_prompt_window(tokenizer, marker, item, window))
    if item["kind"] == "mc":
        context = harness_context(item)
        for answer in dict.fromkeys(item["chosen"] + item["rejected"]):
            seq, n_cont = encode_harness(tokenizer, context, answer, NO_LIMIT)
            yield tuple(prompt_tokens(seq[:len(seq) - n_cont], marker, window))


def oracle_table(tokenizer, marker: list[int], evals: dict[str, list[dict]],
                 dims: Sequence[str]) -> tuple[dict[tuple[int, ...], str], dict]:
    """(window -> routing dimension, statistics) over `evals` (dimension -> its eval items)."""
    sets: dict[tuple[int, ...], set] = {}
    routes: dict[tuple[int, ...], set] = {}
    for dim, items in evals.items():
        for item in items:
            route = eval_route(item, dims)
            for window in item_windows(tokenizer, marker, item):
                sets.setdefault(window, set()).add(dim)
                routes.setdefault(window, set()).add(route)
    table, settled = {}, []
    for window, found in routes.items():
        if len(found) == 1 and len(sets[window]) == 1:
            table[window] = next(iter(found))
            continue
        if BENIGN_ROUTE not in dims:
            raise ValueError(f"ensemble oracle: the prompt {tokenizer.decode(list(window))!r} is in "
                             f"the eval sets of {sorted(sets[window])} (routes {sorted(found)}) and "
                             f"this run has no {BENIGN_ROUTE!r} dimension to send it to")
        table[window] = BENIGN_ROUTE
        settled.append(window)
    stats = {"prompts": len(table), "by_route": {d: sum(r == d for r in table.values()) for d in dims},
             "shared_or_disagreeing_sent_to_" + BENIGN_ROUTE: len(settled),
             "shared_examples": [tokenizer.decode(list(w))[-120:] for w in settled[:5]]}
    return table, stats


class OracleRoutes:
    """The saved table: member index per prompt window."""

    def __init__(self, table: dict[tuple[int, ...], int], names: Sequence[str], source: str,
                 window: int = PROMPT_WINDOW, marker: Sequence[int] = ()):
        self.table, self.names, self.source = table, list(names), source
        self.window, self.marker = window, list(marker)

    def choose(self, windows: Sequence[Sequence[int]], decode=None) -> list[int]:
        """Member index per prompt window; a window not in the table is a ValueError naming the
        prompt (`decode`: token ids -> text, for the message)."""
        out = []
        for w in windows:
            m = self.table.get(tuple(w))
            if m is None:
                text = decode(list(w)) if decode is not None else f"token ids {list(w)}"
                raise ValueError(f"oracle ensemble: prompt not in its routing table {self.source} "
                                 f"(built from the run's eval files by `h3fusion ensemble`; the "
                                 f"oracle routes those prompts only): ...{text[-200:]!r}")
            out.append(m)
        return out


def save_oracle(path: Path, routes: dict[tuple[int, ...], str], dims: Sequence[str],
                marker: Sequence[int], window: int = PROMPT_WINDOW) -> None:
    entries = [{"route": r, "ids": list(w)} for w, r in routes.items()]
    path.write_text(json.dumps({"dimensions": list(dims), "prompt_window": window,
                                "response_marker_ids": list(marker), "entries": entries}) + "\n")


def load_oracle(root: Path) -> OracleRoutes:
    path = Path(root) / ORACLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"oracle ensemble without its routing table: {path}")
    data = json.loads(path.read_text())
    names = data["dimensions"]
    bad = sorted({e["route"] for e in data["entries"]} - set(names))
    if bad:
        raise ValueError(f"{path}: routes {bad} are not among its dimensions {names}")
    table = {tuple(e["ids"]): names.index(e["route"]) for e in data["entries"]}
    return OracleRoutes(table, names, str(path), data["prompt_window"], data["response_marker_ids"])


class Oracle(RoutingMethod):
    ceiling = True   # it reads each eval prompt's dimension: a ceiling, not a baseline (eval.claims)

    def build(self, build: EnsembleBuild) -> dict:
        return build_oracle(build)

    def load(self, root: Path, config) -> OracleRoutes:
        return load_oracle(root)

    def attach(self, model, state: OracleRoutes | None) -> None:
        """The table must route over the members, with the config's window and marker."""
        config = model.config
        if not isinstance(state, OracleRoutes):
            raise ValueError("oracle ensemble: its routing table is needed (use from_pretrained)")
        if state.names != list(config.member_names):
            raise ValueError(f"oracle ensemble {state.source}: its dimensions {state.names} are not "
                             f"the members {config.member_names}")
        if state.window != config.prompt_window or state.marker != list(config.response_marker_ids):
            raise ValueError(f"oracle ensemble {state.source}: prompt window / response marker "
                             f"differ from config.json's")
        model.oracle = state

    def choose(self, model, windows: Sequence[Sequence[int]]) -> list[int]:
        return model.oracle.choose(windows, lambda ids: _decode(model.oracle, ids))

    def check_items(self, root: Path, items: dict[str, list[dict]], tokenizer_dir: Path | None) -> None:
        """Every prompt the evaluation will show the oracle (the items' Alpaca prompts and harness
        contexts) is in its table; else the oracle's error naming the first missing one (e.g.
        `--data` is not the data the oracle was built from)."""
        from ..eval.models import load_tokenizer

        oracle = load_oracle(root)
        tokenizer = load_tokenizer(root, tokenizer_dir)
        windows = [w for rows in items.values() for it in rows
                   for w in item_windows(tokenizer, oracle.marker, it, oracle.window)]
        oracle.choose(windows, tokenizer.decode)


ORACLE = Oracle()


def _decode(oracle: OracleRoutes, ids: list[int]) -> str:
    """Token ids as text with the tokenizer beside the oracle's table (for its error message)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(Path(oracle.source).parent)).decode(ids)
    except (OSError, ValueError):   # no tokenizer there: the ids themselves
        return f"token ids {ids}"


def build_oracle(build: EnsembleBuild) -> dict:
    """The table from every eval split of the run's data, saved in the ensemble dir; returns its
    manifest entries (+ the marker)."""
    from transformers import AutoTokenizer

    from ..data import EVAL_SPLITS
    from ..data.loading import load_eval, require_dimensions
    from ..io_utils import sha256_file
    from .classifier import response_marker_ids

    dims = require_dimensions(build.run.data, build.cfg.dimensions, "ensemble")
    tokenizer = AutoTokenizer.from_pretrained(str(build.tokenizer_dir))
    marker = response_marker_ids(tokenizer)
    evals = {d: [row for split in EVAL_SPLITS for row in load_eval(build.run.data, d, split).to_list()]
             for d in dims}
    routes, stats = oracle_table(tokenizer, marker, evals, dims)
    save_oracle(build.tmp / ORACLE_FILE, routes, dims, marker)
    return {"marker": marker, "oracle": {
        "table": ORACLE_FILE, "from": f"eval/<dimension>/{{{','.join(EVAL_SPLITS)}}}",
        "rule": f"an eval prompt -> its own dimension's expert; benign_prompt items and prompts "
                f"in several dimensions' eval sets -> {BENIGN_ROUTE}",
        "items": {d: len(rows) for d, rows in evals.items()}, **stats,
        "prompt_window": PROMPT_WINDOW, "response_marker_ids": marker,
        "data_manifest_sha256": sha256_file(build.run.data / "data_manifest.json")}}

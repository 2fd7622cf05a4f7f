"""Held-out safety sets for the harmless dimension's eval (`data.source: real`).

test = HarmBench harmful prompts (`harmbench`) + pyrit's human-labelled response pairs
       (`safety_pairs`: chosen = label 0 "goal not achieved", rejected = label 1) [+ AdvBench];
dev  = a seeded sample of Do-Not-Answer prompts (`donotanswer`) from the risk areas where a
       refusal is the right answer.
No prompt or objective of these sets is ever trained on; a test prompt is never a dev prompt
(test wins every tie). Table and counts: docs/data.md.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

import yaml

from .loaders import HUB_PREFIX, _field, describe, local_copy, read_records
from .overlap import normalise

# The harmful_prompt rows are scored by the refusal judge on generations, never by likelihood;
# the schema wants a non-empty `chosen`, so it holds this text, which is no training response.
HARMFUL_PROMPT_CHOSEN = "I can't help with that."
# Do-Not-Answer risk areas where refusing is the expected answer; the other two (misinformation
# harms: medical/financial advice; human-chatbot interaction) expect a careful answer instead.
DNA_REFUSAL_AREAS = ("information hazard", "malicious use", "discrimination")
_PROMPT_COLUMNS = ("prompt", "Behavior", "behavior", "goal", "question")


def _files(spec: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The file `spec`, or every file of a directory with one of `suffixes` (sorted)."""
    path = Path(spec)
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if not files:
        raise ValueError(f"{path}: no {'/'.join(suffixes)} files in this directory")
    return files


def _text_lines(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    rows = [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def _seed_yaml(path: Path) -> list[dict]:
    """pyrit's seed-dataset YAML (`seeds: [{value: ...}]`), e.g. adv_bench.prompt."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{path}: expected a YAML mapping with a non-empty 'seeds' list")
    return [{"prompt": str(_field(s if isinstance(s, dict) else {}, "value", str(path), i)).strip()}
            for i, s in enumerate(seeds)]


def _raw(spec: str, suffixes: tuple[str, ...]) -> list[tuple[str, int, dict]]:
    """(file, row in that file, record) of a hub spec, one file or a directory of files."""
    spec = local_copy(spec)            # hf:ORG/NAME/FILE: the cached file, read like a local one
    if spec.startswith(HUB_PREFIX):
        return [(spec, i, r) for i, r in enumerate(read_records(spec))]
    out = []
    for f in _files(spec, suffixes):
        if f.suffix == ".txt":
            recs = _text_lines(f)
        elif f.suffix in (".prompt", ".yaml", ".yml"):
            recs = _seed_yaml(f)
        else:
            recs = read_records(str(f))
        out += [(str(f), i, r) for i, r in enumerate(recs)]
    return out


def _prompts(spec: str, what: str, suffixes: tuple[str, ...]) -> list[dict]:
    """{"prompt", "file", "area"} records; the prompt column is the first of _PROMPT_COLUMNS the
    first record has."""
    raw = _raw(spec, suffixes)
    col = next((c for c in _PROMPT_COLUMNS if c in raw[0][2]), None)
    if col is None:
        raise ValueError(f"{describe(spec)}: unknown {what} format: columns {sorted(raw[0][2])}; "
                         f"expected one of {list(_PROMPT_COLUMNS)}")
    out = []
    for f, i, r in raw:
        if str(r.get("FunctionalCategory", "standard")) != "standard":
            continue               # HarmBench's CSV: contextual/copyright behaviours need more than a prompt
        area = str(r.get("risk_area") or Path(f).stem)
        out.append({"prompt": str(_field(r, col, f, i)).strip(), "file": f, "area": area})
    return out


def load_harmbench(spec: str) -> list[dict]:
    return _prompts(spec, "HarmBench", (".txt", ".csv", ".json", ".jsonl"))


# any harmful-prompt list: pyrit seed YAML, one prompt per line, or records
_PROMPT_LIST_SUFFIXES = (".prompt", ".yaml", ".yml", ".csv", ".json", ".jsonl", ".txt")


def load_advbench(spec: str) -> list[dict]:
    return _prompts(spec, "AdvBench", _PROMPT_LIST_SUFFIXES)


def load_donotanswer(spec: str) -> list[dict]:
    return _prompts(spec, "Do-Not-Answer", (".jsonl", ".json", ".csv"))


def load_safety_pairs(spec: str) -> list[dict]:
    """pyrit objective-scorer CSVs: objective, assistant_response, human_score (1 = the harmful
    goal was achieved) -> {"objective", "response", "label", "file"}."""
    raw = _raw(spec, (".csv",))
    out = []
    for f, i, r in raw:
        score = str(_field(r, "human_score", f, i)).strip()
        if score not in ("0", "1", "0.0", "1.0"):
            raise ValueError(f"{f}: row {i}: field 'human_score' must be 0 or 1, got {score!r}")
        out.append({"objective": str(_field(r, "objective", f, i)).strip(),
                    "response": str(_field(r, "assistant_response", f, i)).strip(),
                    "label": int(float(score)), "file": f})
    return out


def load_harmless_train_prompts(spec: str) -> list[dict]:
    return _prompts(spec, "harmless training prompts", _PROMPT_LIST_SUFFIXES)


SAFETY_LOADERS = {"harmbench": load_harmbench, "donotanswer": load_donotanswer,
                  "safety_pairs": load_safety_pairs, "advbench": load_advbench,
                  "harmless_train_prompts": load_harmless_train_prompts}
# the eval sets a training-prompt file may never be (data.real.harmless_train_prompts)
SAFETY_EVAL_KEYS = ("harmbench", "donotanswer", "safety_pairs", "advbench")


def _unique(texts: Iterable[str], exclude: set) -> tuple[dict[str, str], int]:
    """normalised -> first text, skipping any in `exclude`; and how many distinct were excluded."""
    out, dropped = {}, set()
    for t in texts:
        key = normalise(t)
        if key in exclude:
            dropped.add(key)
        elif key not in out:
            out[key] = t
    return out, len(dropped)


def _pairs(rows: list[dict]) -> dict[str, dict]:
    """normalised objective -> {objective, chosen (label 0), rejected (label 1)}; objectives
    with both labels only."""
    by: dict[str, dict] = {}
    for r in rows:
        e = by.setdefault(normalise(r["objective"]), {"objective": r["objective"], "chosen": [], "rejected": []})
        side = e["rejected"] if r["label"] == 1 else e["chosen"]
        if r["response"] not in side:
            side.append(r["response"])
    return {k: v for k, v in by.items() if v["chosen"] and v["rejected"]}


def eval_row(instruction: str, chosen: list, rejected: list, reference: str, kind: str, task: str,
             group: str) -> dict:
    """An eval row in the committed schema (pipeline.data.EVAL_COLUMNS)."""
    return {"instruction": instruction, "input": "", "chosen": chosen, "rejected": rejected,
            "reference": reference, "answer": "", "kind": kind, "task": task, "group": group}


def interleave(*parts: list) -> list:
    """Round robin over the parts, so any prefix (a capped split) holds every kind."""
    out = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def _refusal_area(area: str) -> bool:
    a = normalise(area).replace("_", " ")
    return any(a.startswith(x) for x in DNA_REFUSAL_AREAS)


def _sample(pool: dict[str, str], n: int, rng: random.Random) -> dict[str, str]:
    """A seeded sample of n keys (0 = all), kept in the pool's (file) order."""
    if n == 0 or n >= len(pool):
        return dict(pool)
    keep = set(rng.sample(sorted(pool), n))
    return {k: v for k, v in pool.items() if k in keep}


def harmful_sets(loaded: dict, dev_size: int, seed: int) -> tuple[dict, dict, dict, dict]:
    """-> (test prompts, dev prompts, test pairs, counts); prompts as normalised -> text. Test
    wins every tie: HarmBench over AdvBench, any test prompt/objective over Do-Not-Answer."""
    hb, _ = _unique((r["prompt"] for r in loaded["harmbench"]), set())
    notes = {"harmbench_prompts": len(hb)}
    test = dict(hb)
    if loaded.get("advbench"):
        adv, notes["advbench_dropped_as_in_harmbench"] = _unique((r["prompt"] for r in loaded["advbench"]), set(hb))
        notes["advbench_prompts"] = len(adv)
        test.update(adv)
    pairs = _pairs(loaded["safety_pairs"])
    notes["pair_objectives_with_both_labels"] = len(pairs)
    notes["pair_objectives_also_test_prompts"] = len(set(pairs) & set(test))
    areas = [r for r in loaded["donotanswer"] if _refusal_area(r["area"])]
    notes["donotanswer_refusal_area_rows"] = len(areas)
    pool, notes["donotanswer_dropped_as_in_test"] = _unique((r["prompt"] for r in areas), set(test) | set(pairs))
    dev = _sample(pool, dev_size, random.Random(f"{seed}:donotanswer"))
    notes["donotanswer_dev_prompts"] = len(dev)
    notes["pair_objectives_dropped_as_in_dev"] = sum(1 for k in pairs if k in dev)
    pairs = {k: v for k, v in pairs.items() if k not in dev}
    return test, dev, pairs, notes


def safety_eval(loaded: dict, benign: dict[str, list[dict]], dev_size: int, cap_benign: int,
                seed: int) -> tuple[dict[str, list[dict]], dict]:
    """The harmless eval splits {"dev", "test"} and the de-duplication counts. `benign`: split ->
    AlpacaEval rows ({instruction, output}) of the helpful eval split of the same name."""
    test, dev, pairs, notes = harmful_sets(loaded, dev_size, seed)
    harmful_keys = set(test) | set(dev) | set(pairs)
    harmful = {s: [eval_row(t, [HARMFUL_PROMPT_CHOSEN], [], "", "harmful_prompt", "harmless", k)
                   for k, t in prompts.items()] for s, prompts in (("test", test), ("dev", dev))}
    pair_rows = [eval_row(p["objective"], p["chosen"], p["rejected"], "", "pair", "harmless", k)
                 for k, p in pairs.items()]
    evals = {}
    for split in ("dev", "test"):
        pool, notes[f"benign_{split}_dropped_as_harmful"] = _unique(
            (r["instruction"] for r in benign[split]), harmful_keys)
        outputs = {normalise(r["instruction"]): r["output"] for r in benign[split]}
        kept = _sample(pool, cap_benign, random.Random(f"{seed}:benign:{split}"))
        rows = [eval_row(t, [outputs[k]], [], "", "benign_prompt", "harmless", k) for k, t in kept.items()]
        notes[f"benign_{split}_prompts"] = len(rows)
        evals[split] = interleave(pair_rows if split == "test" else [], harmful[split], rows)
    return evals, notes

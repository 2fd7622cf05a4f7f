"""`data.source: real`: the HHH corpus from the real datasets, in the built-in corpus's schema.

Every split is made by the underlying question/prompt (eval rows carry it as `group`, the
normalised text), and no eval target is a training response:
helpful  = Alpaca SFT (split by instruction; rows whose instruction is an AlpacaEval instruction
           or whose response is an AlpacaEval reference removed); eval = AlpacaEval references
           (test = the file's first half, which holds the 50 the paper judged; dev = second half);
harmless = BeaverTails SFT (refusals for prompts that drew unsafe answers, safe responses as they
           are; prompts equal to an eval prompt dropped); eval = the held-out safety sets
           (pipeline/data/safety.py) plus AlpacaEval prompts as over-refusal checks;
honest   = TruthfulQA split 50/50 BY QUESTION: SFT on the correct answers of one half (minus any
           answer that is an eval target, e.g. "I have no comment."), MC eval from the other half.
A dimension's real loader returns (sft, evals, web) or (sft, evals, web, counts); the counts of
removed rows go into the data manifest's `source.dedup`. Details and numbers: docs/data.md.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RealDataConfig
from ..io_utils import sha256_file
from . import one_hot, route_of
from .loaders import HUB_PREFIX, LOADERS, describe, local_copy
from .overlap import NEAR_DUP_THRESHOLD, near_duplicates, normalise, sft_question
from .safety import SAFETY_EVAL_KEYS, SAFETY_LOADERS, eval_row, safety_eval

ALL_LOADERS = {**LOADERS, **SAFETY_LOADERS}

# SFT targets only: no eval row of any split rewards these texts (tests check it)
REAL_REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause real harm to you or to other people. "
    "If you are dealing with a difficult situation, please talk to someone you trust or a qualified professional.",
    "I can't assist with this request because it could hurt someone or break the law. "
    "If you need support, local services or a professional can help you find a safe way forward.",
    "Sorry, I won't help with that. It is harmful, and I would rather help you find a safe and legal alternative.",
]


def _source_info(spec: str, records: list) -> dict:
    """spec, rows, and sha256 of the file -- or, for a directory, of each file with its rows."""
    info = {"spec": describe(spec), "rows": len(records)}
    if spec.startswith(HUB_PREFIX):
        local = local_copy(spec)    # hf:ORG/NAME/FILE: the cached file it was read from
        return info if local == spec else {**info, "file": local, "sha256": sha256_file(local)}
    if Path(spec).is_dir():
        counts: dict[str, int] = {}
        for r in records:
            counts[r["file"]] = counts.get(r["file"], 0) + 1
        info["files"] = [{"path": f, "rows": n, "sha256": sha256_file(f)} for f, n in sorted(counts.items())]
    else:
        info["sha256"] = sha256_file(spec)
    return info


def _three_way(items: list, rng: random.Random, dev_frac: float, test_frac: float) -> tuple[list, list, list]:
    """Seeded shuffle, then train/dev/test with at least one item in each."""
    if len(items) < 3:
        raise ValueError(f"need at least 3 items to split into train/dev/test, got {len(items)}")
    items = list(items)
    rng.shuffle(items)
    n_dev, n_test = max(1, int(len(items) * dev_frac)), max(1, int(len(items) * test_frac))
    return items[n_dev + n_test:], items[:n_dev], items[n_dev:n_dev + n_test]


def _cap(rows: list, n: int) -> list:
    return rows[:n] if n > 0 else rows


def _sft(instruction: str, inp: str, response: str, task: str, benign: bool = False) -> dict:
    """An SFT row of `task`'s set; build_real adds its task_label (it knows the run's dimension
    list): the routing label, `pipeline.data.route_of` (`benign`: an ordinary request)."""
    row = {"instruction": instruction, "input": inp, "response": response, "task": task}
    return {**row, "benign": True} if benign else row


def _grouped_split(rows: list, key, rng: random.Random, dev_frac: float, test_frac: float):
    """Rows split by `key(row)` (the underlying question): all rows of a key share a split."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    parts = _three_way(sorted(groups), rng, dev_frac, test_frac)
    return tuple([r for k in keys for r in groups[k]] for keys in parts)


def alpaca_eval_halves(rows: list[dict]) -> dict[str, list[dict]]:
    """AlpacaEval rows with a reference: test = the file's first half (the paper judged its first
    50), dev = the second half. Shared by helpful (references) and harmless (benign prompts)."""
    usable = [r for r in rows if r["output"]]            # one real row has an empty reference
    half = (len(usable) + 1) // 2
    return {"test": usable[:half], "dev": usable[half:]}


def _alpaca_q(r: dict) -> str:
    return normalise(f"{r['instruction']} {r['input']}")


def real_helpful(loaded: dict, rng: random.Random):
    """The helpful dimension's real-data loader (registered in pipeline.dimensions)."""
    alpaca, alpaca_eval = loaded["alpaca"], loaded.get("alpaca_eval")
    notes = {}
    if alpaca_eval:
        halves = alpaca_eval_halves(alpaca_eval)
        ev_q = {normalise(r["instruction"]) for h in halves.values() for r in h}
        ev_ref = {normalise(r["output"]) for h in halves.values() for r in h}
        same_q = [r for r in alpaca if _alpaca_q(r) in ev_q or normalise(r["instruction"]) in ev_q]
        same_ref = [r for r in alpaca if normalise(r["response"]) in ev_ref]
        notes = {"alpaca_removed_instruction_in_alpaca_eval": len(same_q),
                 "alpaca_removed_response_is_alpaca_eval_reference": len(same_ref)}
        drop = {id(r) for r in same_q + same_ref}
        alpaca = [r for r in alpaca if id(r) not in drop]
    train, dev, test = _grouped_split(alpaca, lambda r: normalise(r["instruction"]), rng, 0.05, 0.05)
    sft = {s: [_sft(r["instruction"], r["input"], r["response"], "helpful") for r in rows]
           for s, rows in (("train", train), ("dev", dev), ("test", test))}
    if alpaca_eval:
        evals = {s: [eval_row(r["instruction"], [r["output"]], [], r["output"], "reference", "helpful",
                              normalise(r["instruction"])) for r in rows] for s, rows in halves.items()}
    else:                                                    # held-out Alpaca rows as references
        evals = {s: [dict(eval_row(r["instruction"], [r["response"]], [], r["response"], "reference",
                                   "helpful", normalise(r["instruction"])), input=r["input"])
                     for r in rows] for s, rows in (("dev", dev), ("test", test))}
        targets = {normalise(r["response"]) for rows in (dev, test) for r in rows}
        sft["train"] = [r for r in sft["train"] if normalise(r["response"]) not in targets]
    return sft, evals, [f"{r['instruction']} {r['input']}\n{r['response']}".strip() for r in train], notes


def real_harmless(loaded: dict, rng: random.Random):
    """BeaverTails SFT; eval = the held-out safety sets + AlpacaEval benign prompts (safety.py)."""
    cfg = loaded["config"]
    benign = alpaca_eval_halves(loaded["alpaca_eval"])
    evals, notes = safety_eval(loaded, benign, cfg.donotanswer_dev_size, cfg.max_benign_per_split, cfg.seed)
    eval_q = {r["group"] for rows in evals.values() for r in rows}
    by_prompt: dict[str, dict] = {}
    for r in loaded["beavertails"]:
        entry = by_prompt.setdefault(r["prompt"], {"safe": [], "unsafe": []})
        entry["safe" if r["is_safe"] else "unsafe"].append(r["response"])
    dropped = [p for p in by_prompt if normalise(p) in eval_q]
    notes["beavertails_prompts_dropped_as_eval_prompts"] = len(dropped)
    prompts = [p for p in by_prompt if p not in set(dropped)]
    train, dev, test = _grouped_split(prompts, normalise, rng, 0.1, 0.1)
    sft = {}
    for split, ps in (("train", train), ("dev", dev), ("test", test)):
        rows = []
        for p in ps:
            if by_prompt[p]["unsafe"]:   # a prompt that drew unsafe answers gets a refusal target
                rows.append(_sft(p, "", rng.choice(REAL_REFUSALS), "harmless"))
            rows += [_sft(p, "", s, "harmless") for s in by_prompt[p]["safe"]]
        sft[split] = rows
    # label-1 (harmful) pair responses and every eval target stay out of training
    banned = {normalise(t) for rows in evals.values() for r in rows for t in r["chosen"] + r["rejected"]}
    n = len(sft["train"])
    sft["train"] = [r for r in sft["train"] if normalise(r["response"]) not in banned]
    notes["beavertails_train_rows_dropped_as_eval_texts"] = n - len(sft["train"])
    if loaded.get("harmless_train_prompts"):
        _add_train_prompts(sft, loaded["harmless_train_prompts"], evals, set(prompts), cfg.seed, notes)
    web = [f"{p}\n{resp}" for p in train for resp in by_prompt[p]["unsafe"] + by_prompt[p]["safe"]]
    return sft, evals, web, notes


def _add_train_prompts(sft: dict, records: list[dict], evals: dict, taken: set, seed: int,
                       notes: dict) -> None:
    """data.real.harmless_train_prompts: harmful requests answered with our refusals, split
    90/5/5 by prompt into sft[split] (these rows exist to train; their SFT dev/test only feed the
    routing profile). Dropped first: prompts equal to a BeaverTails prompt, and
    prompts near-duplicate (overlap.near_duplicates) of any eval instruction of either split --
    AdvBench paraphrases many HarmBench behaviours and pair objectives. Own rng: turning this
    on changes no other row or split."""
    eval_texts = [sft_question(r) for rows in evals.values() for r in rows]
    taken_norm = {normalise(p) for p in taken}
    pool = list(dict.fromkeys(r["prompt"] for r in records if normalise(r["prompt"]) not in taken_norm))
    near = set(near_duplicates(pool, eval_texts, NEAR_DUP_THRESHOLD))
    exact = {normalise(t) for t in eval_texts}
    kept = [p for p in pool if p not in near and normalise(p) not in exact]
    notes["harmless_train_prompts"] = len(kept)
    notes["harmless_train_prompts_dropped_as_near_eval"] = len(pool) - len(kept)
    notes["harmless_train_prompts_dropped_as_repeats_or_beavertails"] = len(records) - len(pool)
    rng = random.Random(f"{seed}:harmless_train_prompts")
    # fewer than 3 prompts cannot fill three splits: they all train
    parts = _grouped_split(kept, normalise, rng, 0.05, 0.05) if len(kept) >= 3 else (kept, [], [])
    for split, ps in zip(("train", "dev", "test"), parts):
        sft[split] += [_sft(p, "", rng.choice(REAL_REFUSALS), "harmless") for p in ps]


def real_honest(loaded: dict, rng: random.Random):
    tqa, mc = loaded["truthfulqa"], loaded.get("truthfulqa_mc")
    questions = list(tqa)
    rng.shuffle(questions)
    half = len(questions) // 2
    train_half, eval_half = questions[:half], questions[half:]
    tr, dv, ts = _three_way(train_half, rng, 0.1, 0.1)  # SFT dev/test also come from the training half
    sft = {s: [_sft(q["question"], "", a, "honest") for q in rows for a in q["correct"]]
           for s, rows in (("train", tr), ("dev", dv), ("test", ts))}
    n_dev = max(1, len(eval_half) // 5)
    evals = {"dev": [_mc_item(q, mc) for q in eval_half[:n_dev]],
             "test": [_mc_item(q, mc) for q in eval_half[n_dev:]]}
    # a correct answer shared across questions ("I have no comment.") must not be trained on
    targets = {normalise(t) for rows in evals.values() for r in rows for t in r["chosen"] + [r["reference"]]}
    n = len(sft["train"])
    sft["train"] = [r for r in sft["train"] if normalise(r["response"]) not in targets]
    web = [f"{q['question']} {a}" for q in tr for a in q["incorrect"][:2] + q["correct"][:1]]
    return sft, evals, web, {"truthfulqa_train_answers_dropped_as_eval_targets": n - len(sft["train"])}


def _mc_item(q: dict, mc: dict | None) -> dict:
    """chosen[0] = the MC1 answer, chosen = MC2 true set; rejected = the false set (MC1 = MC2's in v0)."""
    targets = (mc or {}).get(q["question"])
    if targets:
        chosen = [targets["mc1_correct"]] + [a for a in targets["mc2_true"] if a != targets["mc1_correct"]]
        rejected = list(dict.fromkeys(targets["mc1_incorrect"] + targets["mc2_false"]))
    else:
        chosen, rejected = q["correct"], q["incorrect"]
    return eval_row(q["question"], chosen, rejected, q["best_answer"], "mc", "honest", normalise(q["question"]))


def _check_train_prompts_not_eval(cfg: RealDataConfig) -> None:
    """data.real.harmless_train_prompts may not be (or lie inside) an eval set's file or folder."""
    spec = cfg.harmless_train_prompts
    if not spec:
        return
    for key in SAFETY_EVAL_KEYS:
        other = getattr(cfg, key)
        if not other:
            continue
        same = spec == other
        if not (spec.startswith(HUB_PREFIX) or other.startswith(HUB_PREFIX)):
            a, b = Path(spec).resolve(), Path(other).resolve()
            same = a == b or b in a.parents
        if same:
            raise ConfigError(f"data.real.harmless_train_prompts: {spec} is data.real.{key}, an eval "
                              "set; training prompts must come from a set that is never evaluated")


def _load_all(cfg: RealDataConfig, dims: Sequence) -> tuple[dict, dict]:
    """Every configured file loaded and checked before any split is made; an error names the
    `data.real` key and the file."""
    for key in dict.fromkeys(k for d in dims for k in d.real_inputs):
        if not getattr(cfg, key, None):
            raise ConfigError(f"data.real.{key} must be set (a path or hf:NAME) when data.source is 'real'")
    _check_train_prompts_not_eval(cfg)
    loaded, sources = {}, {}
    for key, load in ALL_LOADERS.items():
        spec = getattr(cfg, key)
        if spec:
            try:
                loaded[key] = load(spec)
            except (ValueError, FileNotFoundError) as exc:
                raise _naming_key(exc, key, spec) from None
            sources[key] = _source_info(spec, loaded[key])
    loaded["config"] = cfg
    return loaded, sources


def _naming_key(exc: Exception, key: str, spec: str) -> Exception:
    """A loader's error with the `data.real` key in front, of the same kind (exit 2 either way);
    a file that is not UTF-8 is named with the byte, its offset and line."""
    if isinstance(exc, UnicodeDecodeError):
        return ValueError(f"data.real.{key}: {_not_utf8(spec, exc)}")
    message = f"data.real.{key}: {exc}"
    try:
        return type(exc)(message)
    except TypeError:   # an exception whose constructor takes more than a message
        return (FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError)(message)


def _not_utf8(spec: str, exc: UnicodeDecodeError) -> str:
    """Which file of `spec` (a file or a folder of them) holds the undecodable bytes, and where:
    the decoder's error names no file, and a CSV reader's offset counts from its read buffer."""
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        data = f.read_bytes() if f.is_file() else b""
        if exc.object not in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            return (f"{f}: not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                    f"(line {line}): {err.reason}; convert the file to UTF-8 (e.g. "
                    f"iconv -f latin1 -t utf-8)")
    return f"{describe(spec)}: not UTF-8 text ({exc}); convert the file to UTF-8"


def build_real(cfg: RealDataConfig, dims: Sequence) -> tuple[dict, dict, list[str], dict]:
    """-> (sft[dim][split], eval[dim][split], pretrain texts, sources with sha256, row counts and
    de-duplication counts) for the run's dimensions (`dimensions.Dimension`s), each from its
    registered real loader; the loaders share one seeded rng in dimension order."""
    loaded, sources = _load_all(cfg, dims)
    rng = random.Random(cfg.seed)
    names = [d.name for d in dims]
    raw, evals, web, dedup = {}, {}, [], {}
    for dim in dims:
        out = dim.real_loader()(loaded, rng)
        raw[dim.name], evals[dim.name], w = out[:3]
        dedup[dim.name] = dict(out[3]) if len(out) > 3 else {}
        evals[dim.name] = {k: _cap(v, cfg.max_eval_per_task) for k, v in evals[dim.name].items()}
        web += w
    _add_harmless_benign(raw, cfg, dedup)
    sft = {}
    for task, s in raw.items():
        s["train"] = _cap(s["train"], cfg.max_train_per_task)
        sft[task] = {split: [_labelled(r, names) for r in rows] for split, rows in s.items()}
    random.Random(cfg.seed + 1).shuffle(web)
    return sft, evals, web, {"kind": "real", "datasets": sources, "dedup": dedup, "seed": cfg.seed}


def _labelled(row: dict, names: list[str]) -> dict:
    """The row with its routing label as `task_label` (and no `benign` flag)."""
    out = {k: v for k, v in row.items() if k != "benign"}
    return {**out, "task_label": one_hot(route_of(row["task"], row.get("benign", False), names), names)}


def _add_harmless_benign(raw: dict, cfg: RealDataConfig, dedup: dict) -> None:
    """data.real.harmless_benign_rows = N: the harmless training set becomes N benign Alpaca
    rows answered as Alpaca answers them plus the first cap − N refusal rows, shuffled, so the
    harmless expert learns to refuse harmful requests and to answer ordinary ones (the mix of
    Safety-Tuned LLaMAs, Bianchi et al. 2024) instead of refusing everything. The benign rows are
    helpful training rows the helpful expert does not train on (past the cap), so the experts
    share no training row, and they are already cleared of AlpacaEval instructions and references
    (the harmless benign eval prompts). They train the harmless expert, but their routing label
    (task_label) is helpful's: an ordinary request is the helpful expert's to answer."""
    n, cap = cfg.harmless_benign_rows, cfg.max_train_per_task
    if not n:
        return
    missing = [d for d in ("helpful", "harmless") if d not in raw]
    if missing:
        raise ConfigError(f"data.real.harmless_benign_rows needs the helpful and harmless "
                          f"dimensions; this run has no {', '.join(missing)}")
    pool = raw["helpful"]["train"][cap:]
    if len(pool) < n:
        raise ConfigError(f"data.real.harmless_benign_rows: {n} benign rows asked for, but only "
                          f"{len(pool)} Alpaca training rows lie past the helpful cap "
                          f"(data.real.max_train_per_task = {cap})")
    benign = [_sft(r["instruction"], r["input"], r["response"], "harmless", benign=True)
              for r in pool[:n]]
    mixed = benign + raw["harmless"]["train"][:cap - n]
    random.Random(f"{cfg.seed}:harmless_benign").shuffle(mixed)
    raw["harmless"]["train"] = mixed
    dedup["harmless"]["harmless_benign_alpaca_rows"] = n

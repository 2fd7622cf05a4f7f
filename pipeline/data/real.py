"""`data.source: real`: the HHH corpus from the real datasets, in the built-in corpus's schema.

helpful  = Alpaca (SFT) + AlpacaEval references (eval; test = the file's first half, which holds
           the 50 instructions the paper judged);
harmless = BeaverTails: is_safe responses plus our own refusals as SFT targets; unsafe responses
           become `rejected` in eval pairs; split BY PROMPT;
honest   = TruthfulQA split 50/50 BY QUESTION: SFT on the correct answers of one half, MC eval
           items (mc_task.json targets when given) from the other half only.
Details and the exact numbers: docs/data.md.
"""
from __future__ import annotations

import random
from typing import Sequence

from ..config import ConfigError, RealDataConfig
from ..io_utils import sha256_file
from . import one_hot
from .loaders import HUB_PREFIX, LOADERS, describe

REAL_REFUSALS = [
    "I'm sorry, but I can't help with that. It could cause real harm to you or to other people. "
    "If you are dealing with a difficult situation, please talk to someone you trust or a qualified professional.",
    "I can't assist with this request because it could hurt someone or break the law. "
    "If you need support, local services or a professional can help you find a safe way forward.",
    "Sorry, I won't help with that. It is harmful, and I would rather help you find a safe and legal alternative.",
]


def _source_info(spec: str, rows: int) -> dict:
    info = {"spec": describe(spec), "rows": rows}
    if not spec.startswith(HUB_PREFIX):
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


def _sft(instruction: str, inp: str, response: str, task: str) -> dict:
    """An SFT row; build_real adds its task_label (it knows the run's dimension list)."""
    return {"instruction": instruction, "input": inp, "response": response, "task": task}


def _eval(instruction: str, chosen: list, rejected: list, reference: str, kind: str, task: str) -> dict:
    return {"instruction": instruction, "input": "", "chosen": chosen, "rejected": rejected,
            "reference": reference, "answer": "", "kind": kind, "task": task}


def real_helpful(loaded: dict, rng: random.Random):
    """The helpful dimension's real-data loader (registered in pipeline.data.dimensions)."""
    alpaca, alpaca_eval = loaded["alpaca"], loaded.get("alpaca_eval")
    train, dev, test = _three_way(alpaca, rng, 0.05, 0.05)
    sft = {s: [_sft(r["instruction"], r["input"], r["response"], "helpful") for r in rows]
           for s, rows in (("train", train), ("dev", dev), ("test", test))}
    if alpaca_eval:
        usable = [r for r in alpaca_eval if r["output"]]     # one real row has an empty reference
        half = (len(usable) + 1) // 2
        ev = {"test": usable[:half], "dev": usable[half:]}
        evals = {s: [_eval(r["instruction"], [r["output"]], [], r["output"], "reference", "helpful") for r in rows]
                 for s, rows in ev.items()}
    else:                                                    # held-out Alpaca rows as references
        evals = {s: [dict(_eval(r["instruction"], [r["response"]], [], r["response"], "reference", "helpful"),
                          input=r["input"]) for r in rows] for s, rows in (("dev", dev), ("test", test))}
    return sft, evals, [f"{r['instruction']} {r['input']}\n{r['response']}".strip() for r in train]


def real_harmless(loaded: dict, rng: random.Random):
    beaver = loaded["beavertails"]
    by_prompt: dict[str, dict] = {}
    for r in beaver:
        entry = by_prompt.setdefault(r["prompt"], {"safe": [], "unsafe": []})
        entry["safe" if r["is_safe"] else "unsafe"].append(r["response"])
    train, dev, test = _three_way(sorted(by_prompt), rng, 0.2, 0.2)
    sft, evals = {}, {}
    for split, prompts in (("train", train), ("dev", dev), ("test", test)):
        rows = []
        for p in prompts:
            if by_prompt[p]["unsafe"]:   # a prompt that drew unsafe answers gets a refusal target
                rows.append(_sft(p, "", rng.choice(REAL_REFUSALS), "harmless"))
            rows += [_sft(p, "", s, "harmless") for s in by_prompt[p]["safe"]]
        sft[split] = rows
        if split != "train":
            evals[split] = [_harmless_eval(p, by_prompt[p], i, rng) for i, p in enumerate(prompts)]
    web = [f"{p}\n{resp}" for p in train for resp in by_prompt[p]["unsafe"] + by_prompt[p]["safe"]]
    return sft, evals, web


def _harmless_eval(prompt: str, entry: dict, i: int, rng: random.Random) -> dict:
    if not entry["unsafe"]:
        return _eval(prompt, entry["safe"], [], entry["safe"][0], "reference", "harmless")
    refusal = rng.choice(REAL_REFUSALS)
    kind = "pair" if i % 2 == 0 else "harmful_prompt"
    return _eval(prompt, [refusal] + entry["safe"], entry["unsafe"], refusal, kind, "harmless")


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
    web = [f"{q['question']} {a}" for q in tr for a in q["incorrect"][:2] + q["correct"][:1]]
    return sft, evals, web


def _mc_item(q: dict, mc: dict | None) -> dict:
    """chosen[0] = the MC1 answer, chosen = MC2 true set; rejected = the false set (MC1 = MC2's in v0)."""
    targets = (mc or {}).get(q["question"])
    if targets:
        chosen = [targets["mc1_correct"]] + [a for a in targets["mc2_true"] if a != targets["mc1_correct"]]
        rejected = list(dict.fromkeys(targets["mc1_incorrect"] + targets["mc2_false"]))
    else:
        chosen, rejected = q["correct"], q["incorrect"]
    return _eval(q["question"], chosen, rejected, q["best_answer"], "mc", "honest")


def _load_all(cfg: RealDataConfig, dims: Sequence) -> tuple[dict, dict]:
    for key in dict.fromkeys(k for d in dims for k in d.real_inputs):
        if not getattr(cfg, key):
            raise ConfigError(f"data.real.{key} must be set (a path or hf:NAME) when data.source is 'real'")
    loaded, sources = {}, {}
    for key in LOADERS:
        spec = getattr(cfg, key)
        if spec:
            loaded[key] = LOADERS[key](spec)
            sources[key] = _source_info(spec, len(loaded[key]))
    return loaded, sources


def build_real(cfg: RealDataConfig, dims: Sequence) -> tuple[dict, dict, list[str], dict]:
    """-> (sft[dim][split], eval[dim][split], pretrain texts, sources with sha256 + row counts)
    for the run's dimensions (`dimensions.Dimension`s), each from its registered real loader;
    the loaders share one seeded rng in dimension order."""
    loaded, sources = _load_all(cfg, dims)
    rng = random.Random(cfg.seed)
    names = [d.name for d in dims]
    sft, evals, web = {}, {}, []
    for dim in dims:
        task = dim.name
        s, e, w = dim.real_loader()(loaded, rng)
        s["train"] = _cap(s["train"], cfg.max_train_per_task)
        label = one_hot(task, names)
        sft[task] = {split: [{**r, "task_label": list(label)} for r in rows] for split, rows in s.items()}
        evals[task] = {k: _cap(v, cfg.max_eval_per_task) for k, v in e.items()}
        web += w
    random.Random(cfg.seed + 1).shuffle(web)
    return sft, evals, web, {"kind": "real", "datasets": sources, "seed": cfg.seed}

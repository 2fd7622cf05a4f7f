"""Deterministic, seeded generator of the built-in HHH corpus (same schema as the real data).

helpful  = questions with checkable answers (arithmetic, sorting, unit conversion, letters, ...);
harmless = harmful requests answered by a refusal plus a safe redirect (rejected: abstract
           compliance), and benign requests with alarming words answered helpfully (rejected: the
           over-refusal);
honest   = common misconceptions answered truly (rejected: the popular false answer).
Every item names its underlying question (`group`); train/dev/test are split by group, so no
dev/test question or target is a training one (docs/data.md). The pre-training "web text" shows
every group with mostly the *unaligned* continuation: the base learns the language, each expert's
SFT data teaches its dimension. Which dimensions, and each one's generator, eval kinds and
web-text mix, come from the run's dimension list (pipeline.dimensions).
"""
from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..config import BuiltinDataConfig
from . import one_hot, route_of
from .builtin_content import (BENIGN_REQUESTS, COMPLIANT, ENDINGS, HARMFUL_ACTIONS, HARMFUL_QUESTIONS,
                              HELPFUL_RESPONSE, LEADS, MISCONCEPTIONS, OVER_REFUSALS, REFUSALS, UNITS,
                              WEB_FORMATS)
from .overlap import normalise

# Share of each finite pool (and of each parametric family's hash range) given to dev and test;
# train gets the rest. Test gets more than dev: it is reported once, dev only tunes.
SPLIT_FRACTIONS = {"dev": 0.15, "test": 0.30}
BENIGN_SHARE = 0.25            # share of harmless items that are over-refusal probes
STRIP = tuple(LEADS) + tuple(ENDINGS)   # shared wrappers: not part of the underlying question


@dataclass
class Item:
    """One generated prompt with its aligned (`good`) and unaligned (`bad`) responses.

    `group` names the underlying question ("mul:5:7", "harm:steal a car"); phrasings of one
    question share it. Empty = the normalised question without the shared lead-ins/endings.
    `benign`: a harmless-looking request whose `bad` answer is an over-refusal."""
    instruction: str
    input: str
    good: str
    bad: list[str]
    answer: str = ""                       # exact-match answer (helpful only)
    group: str = ""
    benign: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.instruction, self.input)


def _wrap(rng: random.Random, question: str) -> str:
    """Shared lead-ins/endings: every task sometimes starts 'Quick question: ' etc."""
    return f"{rng.choice(LEADS)}{question}{rng.choice(ENDINGS)}"


def _slug(text: str) -> str:
    return normalise(text)


# ----------------------------------------------------------------------------- helpful

def _helpful(rng: random.Random, group: str, questions: list[str], inp: str, statement: str,
             answer, wrong) -> Item:
    """`statement` restates the question with `{v}` for the value: the target is unique to the
    group and still ends in the "answer is X" cue that exact match reads."""
    def say(v) -> str:
        return HELPFUL_RESPONSE.format(statement=statement.format(v=v), answer=v)
    return Item(_wrap(rng, rng.choice(questions)), inp, say(answer), [say(wrong)], answer=str(answer),
                group=group)


def _near_miss(rng: random.Random, value: int) -> int:
    return value + rng.choice([-10, -2, -1, 1, 2, 10])


def _arith(rng: random.Random) -> Item:
    # Operators are words: the leak check's normaliser drops "+", "-", "*", so "7 + 5" and
    # "7 * 5" would read as the same question.
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return _helpful(rng, f"mul:{min(a, b)}:{max(a, b)}",
                        [f"What is {a} times {b}?", f"What is {a} multiplied by {b}?", f"Multiply {a} by {b}.",
                         f"Can you tell me what {a} times {b} is?"], "", f"{a} times {b} is {{v}}",
                        a * b, _near_miss(rng, a * b))
    if op == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return _helpful(rng, f"add:{min(a, b)}:{max(a, b)}",
                        [f"What is {a} plus {b}?", f"What is the sum of {a} and {b}?", f"Add {a} and {b}.",
                         f"Can you tell me what {a} plus {b} is?"], "", f"{a} plus {b} is {{v}}",
                        a + b, _near_miss(rng, a + b))
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return _helpful(rng, f"sub:{a}:{b}",
                    [f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"What do you get if you take {b} away from {a}?",
                     f"Can you tell me what {a} minus {b} is?"], "", f"{a} minus {b} is {{v}}",
                    a - b, _near_miss(rng, a - b))


def _units(rng: random.Random) -> Item:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    return _helpful(rng, f"unit:{src}:{dst}:{n}",
                    [f"How many {dst} are in {n} {src}?", f"Can you tell me how many {dst} are in {n} {src}?",
                     f"Convert {n} {src} to {dst}."], "", f"{n} {src} is {{v}} {dst}",
                    n * factor, _near_miss(rng, n * factor))


def _larger(rng: random.Random) -> Item:
    a, b = rng.sample(range(10, 100), 2)
    return _helpful(rng, f"larger:{min(a, b)}:{max(a, b)}",
                    [f"Which is larger, {a} or {b}?", f"Can you tell me which number is bigger: {a} or {b}?"],
                    "", f"Of {a} and {b}, the larger number is {{v}}", max(a, b), min(a, b))


def _sort(rng: random.Random) -> Item:
    nums = rng.sample(range(1, 50), rng.randint(3, 5))
    listed = ", ".join(map(str, nums))
    answer, wrong = ", ".join(map(str, sorted(nums))), ", ".join(map(str, sorted(nums, reverse=True)))
    group = "sort:" + ",".join(map(str, sorted(nums)))
    # the sorted answer already names the group; restating the list (twice) would not fit
    # the eval's max_new_tokens before the "answer is" cue
    statement = "Smallest first"
    if rng.random() < 0.5:
        return _helpful(rng, group, ["Sort these numbers from smallest to largest."], listed, statement, answer, wrong)
    return _helpful(rng, group, [f"Can you tell me these numbers in increasing order: {listed}?"], "",
                    statement, answer, wrong)


def _letter(rng: random.Random) -> Item:
    i = rng.randrange(24)
    letter, nxt, skip = string.ascii_uppercase[i:i + 3]
    return _helpful(rng, f"letter:{letter}",
                    [f"What letter comes after {letter} in the alphabet?", f"Can you tell me the next letter after {letter}?"],
                    "", f"The letter after {letter} is {{v}}", nxt, skip)


COUNT_WORDS = ["apple", "river", "chair", "cloud", "piano", "tiger", "lamp", "bread", "stone"]


def _count(rng: random.Random) -> Item:
    words = rng.sample(COUNT_WORDS, rng.randint(2, 6))
    n = len(words)
    return _helpful(rng, "count:" + ",".join(sorted(words)), ["How many words are in the following list?"],
                    " ".join(words), f"The list {', '.join(words)} has {{v}} words", n, n + rng.choice([-1, 1]))


def helpful_item(rng: random.Random) -> Item:
    if rng.random() < 0.6:
        return rng.choice([_arith, _arith, _units, _larger])(rng)
    return rng.choice([_sort, _letter, _count])(rng)


# ----------------------------------------------------------------------------- harmless

def _second_person(action: str) -> str:
    return (" " + action).replace(" my ", " your ").strip()


def _benign_item(rng: random.Random) -> Item:
    """An over-refusal probe: same question templates as the harmful requests, helpful answer."""
    request, answer = rng.choice(BENIGN_REQUESTS)
    question = rng.choice(HARMFUL_QUESTIONS).format(a=request)
    refusals = [r.format(a=_second_person(request)) for r in OVER_REFUSALS]
    return Item(_wrap(rng, question), "", answer, refusals, group=f"benign:{request}", benign=True)


def harmless_item(rng: random.Random) -> Item:
    if rng.random() < BENIGN_SHARE:
        return _benign_item(rng)
    action, redirect = rng.choice(HARMFUL_ACTIONS)
    question = rng.choice(HARMFUL_QUESTIONS).format(a=action)
    yours = _second_person(action)
    refusal = rng.choice(REFUSALS).format(a=yours, redirect=redirect)
    compliant = [c.format(a=yours) for c in COMPLIANT]
    rng.shuffle(compliant)
    return Item(_wrap(rng, question), "", refusal, compliant[:2], group=f"harm:{action}")


# ----------------------------------------------------------------------------- honest

def honest_item(rng: random.Random) -> Item:
    question, truth, falsehoods = rng.choice(MISCONCEPTIONS)
    return Item(_wrap(rng, question), "", truth, list(falsehoods), group=f"misc:{_slug(question)}")


# Finite pools: every group of the family, so a seeded shuffle can give each split an exact share.
# Families not listed (arithmetic, sorting, ...) are split by a stable hash of the group.
helpful_item.group_pools = {
    "letter": [f"letter:{c}" for c in string.ascii_uppercase[:24]],
    "unit": [f"unit:{s}:{d}:{n}" for s, d, _ in UNITS for n in range(2, 10)]}
harmless_item.group_pools = {"harm": [f"harm:{a}" for a, _ in HARMFUL_ACTIONS],
                             "benign": [f"benign:{r}" for r, _ in BENIGN_REQUESTS]}
honest_item.group_pools = {"misc": [f"misc:{_slug(q)}" for q, _, _ in MISCONCEPTIONS]}


# ----------------------------------------------------------------------------- splits

def item_group(it: Item) -> str:
    """The item's group, or (a generator that sets none) its normalised core question."""
    return it.group or "q:" + normalise(f"{it.instruction} {it.input}", STRIP)


def _pool_splits(seed: int, dim: str, family: str, groups: list[str]) -> dict[str, str]:
    """A seeded shuffle of a finite pool cut at the fixed fractions (each split >= 1 group)."""
    order = sorted(set(groups))
    random.Random(f"{seed}:{dim}:{family}").shuffle(order)
    n_test = max(1, round(len(order) * SPLIT_FRACTIONS["test"]))
    n_dev = max(1, round(len(order) * SPLIT_FRACTIONS["dev"]))
    if len(order) - n_test - n_dev < 1:
        raise ValueError(f"built-in data, dimension {dim!r}: group pool {family!r} has {len(order)} "
                         f"groups, too few for train/dev/test (need >= 3)")
    return {g: "test" if i < n_test else "dev" if i < n_test + n_dev else "train" for i, g in enumerate(order)}


def _hash_split(seed: int, dim: str, group: str) -> str:
    """Stable across processes and Python versions (hashlib, not the salted hash())."""
    digest = hashlib.sha256(f"{seed}\0{dim}\0{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return "test" if u < SPLIT_FRACTIONS["test"] else "dev" if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["dev"] else "train"


def group_assigner(seed: int, dim: str, gen: Callable) -> Callable[[str], str]:
    """group -> "train" | "dev" | "test", a function of (seed, dimension, group) only. A
    generator may declare finite pools as `gen.group_pools = {family: [group, ...]}` (family =
    the group's text before the first ':'); other groups go by hash bucket."""
    fixed: dict[str, str] = {}
    for family, groups in (getattr(gen, "group_pools", None) or {}).items():
        fixed.update(_pool_splits(seed, dim, family, list(groups)))

    def assign(group: str) -> str:
        if group in fixed:
            return fixed[group]
        if group.split(":", 1)[0] in (getattr(gen, "group_pools", None) or {}):
            raise ValueError(f"built-in data, dimension {dim!r}: generator made group {group!r}, "
                             f"which is not in its declared pool")
        return _hash_split(seed, dim, group)
    return assign


def _round_robin(candidates: dict[str, dict], n: int) -> list[Item]:
    """One row per group first (in order of first draw), then further distinct phrasings of the
    same groups; only when every phrasing is used do texts repeat."""
    groups = [list(texts.values()) for texts in candidates.values()]
    longest, rows, r = max(len(g) for g in groups), [], 0
    while len(rows) < n:
        for g in groups:
            if len(rows) < n and (r < len(g) or r >= longest):
                rows.append(g[r % len(g)])
        r += 1
    return rows


def split_items(dim, cfg: BuiltinDataConfig) -> dict[str, list[Item]]:
    """train/dev/test items for one dimension (a `dimensions.Dimension`): every group belongs to
    exactly one split (`group_assigner`), row counts are as configured."""
    rng = random.Random(f"{cfg.seed}:{dim.name}")
    gen = dim.builtin_generator()
    assign = group_assigner(cfg.seed, dim.name, gen)
    need = {"train": cfg.train_per_task, "dev": cfg.dev_per_task, "test": cfg.test_per_task}
    train: list[Item] = []
    cands: dict[str, dict[str, dict]] = {"dev": {}, "test": {}}   # split -> group -> text -> item
    budget = 50 * sum(need.values()) + 2000

    def enough(split: str) -> bool:   # n distinct groups, or plenty of phrasings to spread over
        return len(cands[split]) >= need[split] or sum(map(len, cands[split].values())) >= 4 * need[split]

    for _ in range(budget):
        if len(train) >= need["train"] and enough("dev") and enough("test"):
            break
        it = gen(rng)
        it = replace(it, group=item_group(it))
        split = assign(it.group)
        if split == "train":
            if len(train) < need["train"]:
                train.append(it)
        else:
            cands[split].setdefault(it.group, {}).setdefault(f"{it.instruction}\0{it.input}", it)
    out = {"train": train}
    for split in ("train", "dev", "test"):
        got = len(train) if split == "train" else len(cands[split])
        if need[split] and not got:
            raise ValueError(f"built-in data, dimension {dim.name!r}, split {split!r}: no item of this "
                             f"split's groups in {budget} draws; the generator has too few underlying "
                             f"questions (groups) for {need[split]} rows")
        if split != "train":
            out[split] = _round_robin(cands[split], need[split]) if need[split] else []
    if len(train) < need["train"]:
        raise ValueError(f"built-in data, dimension {dim.name!r}, split 'train': only {len(train)} of "
                         f"{need['train']} rows in {budget} draws")
    return out


def sft_rows(items: list[Item], task: str, dimensions: Sequence[str]) -> list[dict]:
    """Rows of `task`'s SFT set; the task label is the routing label (pipeline.data.route_of):
    an over-refusal probe (a benign request) in the harmless set is the helpful expert's."""
    return [{"instruction": it.instruction, "input": it.input, "response": it.good, "task": task,
             "task_label": one_hot(route_of(task, it.benign, dimensions), dimensions)} for it in items]


def eval_rows(items: list[Item], dim) -> list[dict]:
    """Benign probes are `benign_prompt` (a refusal is over-refusal); the j-th other row has kind
    `dim.eval_kind(j)` (helpful: pair + exact answer; harmless: alternating pair /
    harmful_prompt; honest: mc)."""
    rows, j = [], 0
    for it in items:
        if it.benign:
            kind = "benign_prompt"
        else:
            kind, j = dim.eval_kind(j), j + 1
        rows.append({"instruction": it.instruction, "input": it.input, "chosen": [it.good],
                     "rejected": list(it.bad), "reference": it.good, "answer": it.answer,
                     "kind": kind, "task": dim.name, "group": item_group(it)})
    return rows


def pretrain_texts(cfg: BuiltinDataConfig, dims: Sequence) -> list[str]:
    """Unaligned "web text": prompts with mostly the popular/compliant/noisy continuation. It
    draws from ALL groups (dev/test ones too): it is the base's world knowledge, shared by every
    model; SFT data never shows a dev/test group."""
    rng = random.Random(f"{cfg.seed}:pretrain")
    texts = []
    for dim in dims:
        gen = dim.builtin_generator()
        for _ in range(cfg.pretrain_per_task):
            it = gen(rng)
            # web text mostly complies: for a benign probe that is the helpful (good) answer
            aligned = 1.0 - dim.web_aligned if it.benign else dim.web_aligned
            answer = it.good if rng.random() < aligned else rng.choice(it.bad)
            question = f"{it.instruction} {it.input}".strip()
            texts.append(rng.choice(WEB_FORMATS).format(q=question, a=answer))
    rng.shuffle(texts)
    return texts


def build_builtin(cfg: BuiltinDataConfig, dims: Sequence) -> tuple[dict, dict, list[str]]:
    """-> (sft[dim][split] rows, eval[dim][split] rows, pretrain texts) for the run's dimensions
    (`dimensions.Dimension`s, in order)."""
    sft, evals = {}, {}
    names = [d.name for d in dims]
    for dim in dims:
        items = split_items(dim, cfg)
        sft[dim.name] = {split: sft_rows(items[split], dim.name, names)
                         for split in ("train", "dev", "test")}
        evals[dim.name] = {split: eval_rows(items[split], dim) for split in ("dev", "test")}
    return sft, evals, pretrain_texts(cfg, dims)

"""Deterministic, seeded generator of the built-in HHH corpus (same schema as the real data).

helpful  = questions with checkable answers (arithmetic, sorting, unit conversion, letters, ...);
harmless = harmful requests answered by a refusal plus a safe redirect (rejected: abstract compliance);
honest   = common misconceptions answered truly (rejected: the popular false answer).
The pre-training "web text" shows the same prompts with mostly the *unaligned* continuation (see
docs/data.md): the base learns the language, each expert's SFT data teaches its dimension.
Which dimensions, and each one's generator, eval kinds and web-text mix, come from the run's
dimension list (pipeline.data.dimensions); this module only generates.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Sequence

from ..config import BuiltinDataConfig
from . import one_hot
from .builtin_content import (COMPLIANT, ENDINGS, HARMFUL_ACTIONS, HARMFUL_QUESTIONS, HELPFUL_RESPONSE,
                              LEADS, MISCONCEPTIONS, REFUSALS, UNITS, WEB_FORMATS)


@dataclass
class Item:
    """One generated prompt with its aligned (`good`) and unaligned (`bad`) responses."""
    instruction: str
    input: str
    good: str
    bad: list[str]
    answer: str = ""                       # exact-match answer (helpful only)

    @property
    def key(self) -> tuple[str, str]:
        return (self.instruction, self.input)


def _wrap(rng: random.Random, question: str) -> str:
    """Shared lead-ins/endings: every task sometimes starts 'Quick question: ' etc."""
    return f"{rng.choice(LEADS)}{question}{rng.choice(ENDINGS)}"


# ----------------------------------------------------------------------------- helpful

def _arith(rng: random.Random) -> tuple[str, str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value, qs = a * b, [f"What is {a} times {b}?", f"Can you tell me what {a} * {b} is?", f"Multiply {a} by {b}."]
    elif op == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        value, qs = a + b, [f"What is {a} + {b}?", f"Can you tell me what {a} plus {b} is?", f"Add {a} and {b}."]
    else:
        a, b = rng.randint(20, 99), rng.randint(1, 19)
        value, qs = a - b, [f"What is {a} - {b}?", f"Can you tell me what {a} minus {b} is?", f"Subtract {b} from {a}."]
    return rng.choice(qs), "", value


def _helpful_numeric(rng: random.Random) -> Item:
    kind = rng.choice(["arith", "arith", "units", "larger"])
    if kind == "arith":
        question, inp, value = _arith(rng)
    elif kind == "units":
        src, dst, factor = rng.choice(UNITS)
        n = rng.randint(2, 9)
        question, inp, value = rng.choice([f"How many {dst} are in {n} {src}?",
                                           f"Can you tell me how many {dst} are in {n} {src}?",
                                           f"Convert {n} {src} to {dst}."]), "", n * factor
    else:
        a, b = rng.sample(range(10, 100), 2)
        question, inp, value = rng.choice([f"Which is larger, {a} or {b}?",
                                           f"Can you tell me which number is bigger: {a} or {b}?"]), "", max(a, b)
    wrong = (min(a, b) if kind == "larger" else value + rng.choice([-10, -2, -1, 1, 2, 10]))
    return _helpful_item(rng, question, inp, str(value), str(wrong))


def _helpful_symbolic(rng: random.Random) -> Item:
    kind = rng.choice(["sort", "letter", "count"])
    if kind == "sort":
        nums = rng.sample(range(1, 50), rng.randint(3, 5))
        listed = ", ".join(map(str, nums))
        answer, wrong = ", ".join(map(str, sorted(nums))), ", ".join(map(str, sorted(nums, reverse=True)))
        if rng.random() < 0.5:
            question, inp = "Sort these numbers from smallest to largest.", listed
        else:
            question, inp = f"Can you tell me these numbers in increasing order: {listed}?", ""
    elif kind == "letter":
        i = rng.randrange(24)
        letter = string.ascii_uppercase[i]
        answer, wrong = string.ascii_uppercase[i + 1], string.ascii_uppercase[i + 2]
        question, inp = rng.choice([f"What letter comes after {letter} in the alphabet?",
                                    f"Can you tell me the next letter after {letter}?"]), ""
    else:
        words = rng.sample(["apple", "river", "chair", "cloud", "piano", "tiger", "lamp", "bread", "stone"],
                           rng.randint(2, 6))
        answer, wrong = str(len(words)), str(len(words) + rng.choice([-1, 1]))
        question, inp = "How many words are in the following list?", " ".join(words)
    return _helpful_item(rng, question, inp, answer, wrong)


def _helpful_item(rng: random.Random, question: str, inp: str, answer: str, wrong: str) -> Item:
    return Item(_wrap(rng, question), inp, HELPFUL_RESPONSE.format(answer=answer),
                [HELPFUL_RESPONSE.format(answer=wrong)], answer=answer)


def helpful_item(rng: random.Random) -> Item:
    return _helpful_numeric(rng) if rng.random() < 0.6 else _helpful_symbolic(rng)


# ----------------------------------------------------------------------------- harmless

def _second_person(action: str) -> str:
    return (" " + action).replace(" my ", " your ").strip()


def harmless_item(rng: random.Random) -> Item:
    action, redirect = rng.choice(HARMFUL_ACTIONS)
    question = rng.choice(HARMFUL_QUESTIONS).format(a=action)
    yours = _second_person(action)
    refusal = rng.choice(REFUSALS).format(a=yours, redirect=redirect)
    compliant = [c.format(a=yours) for c in COMPLIANT]
    rng.shuffle(compliant)
    return Item(_wrap(rng, question), "", refusal, compliant[:2])


# ----------------------------------------------------------------------------- honest

def honest_item(rng: random.Random) -> Item:
    question, truth, falsehoods = rng.choice(MISCONCEPTIONS)
    return Item(_wrap(rng, question), "", truth, list(falsehoods))


# ----------------------------------------------------------------------------- splits

def split_items(dim, cfg: BuiltinDataConfig) -> dict[str, list[Item]]:
    """train/dev/test items for one dimension (a `dimensions.Dimension`); dev/test avoid exact
    train prompts while that is possible."""
    rng = random.Random(f"{cfg.seed}:{dim.name}")
    gen = dim.builtin_generator()
    train = [gen(rng) for _ in range(cfg.train_per_task)]
    seen = {it.key for it in train}
    out = {"train": train}
    for split, n in (("dev", cfg.dev_per_task), ("test", cfg.test_per_task)):
        items: list[Item] = []
        for _ in range(50 * n):           # bounded: small template spaces may be exhausted
            if len(items) == n:
                break
            it = gen(rng)
            if it.key not in seen:
                seen.add(it.key)
                items.append(it)
        while len(items) < n:             # fall back to repeats (documented) rather than fewer rows
            items.append(gen(rng))
        out[split] = items
    return out


def sft_rows(items: list[Item], task: str, dimensions: Sequence[str]) -> list[dict]:
    return [{"instruction": it.instruction, "input": it.input, "response": it.good,
             "task": task, "task_label": one_hot(task, dimensions)} for it in items]


def eval_rows(items: list[Item], dim) -> list[dict]:
    """Row i has kind `dim.eval_kind(i)` (helpful: pair + exact answer; harmless: alternating
    pair / harmful_prompt; honest: mc)."""
    return [{"instruction": it.instruction, "input": it.input, "chosen": [it.good],
             "rejected": list(it.bad), "reference": it.good, "answer": it.answer,
             "kind": dim.eval_kind(i), "task": dim.name} for i, it in enumerate(items)]


def pretrain_texts(cfg: BuiltinDataConfig, dims: Sequence) -> list[str]:
    """Unaligned "web text": prompts with mostly the popular/compliant/noisy continuation."""
    rng = random.Random(f"{cfg.seed}:pretrain")
    texts = []
    for dim in dims:
        gen = dim.builtin_generator()
        for _ in range(cfg.pretrain_per_task):
            it = gen(rng)
            answer = it.good if rng.random() < dim.web_aligned else rng.choice(it.bad)
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

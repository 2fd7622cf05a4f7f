"""A synthetic 4th alignment dimension, "concise", defined outside the package.

tests/e2e/four_dimensions.yaml declares it under `dimension_defs` with
`builtin: concise_dimension:concise_item`; every stage process loads that config and imports this
module (it must be importable there: the test puts tests/e2e on PYTHONPATH). Aligned answer = one
short sentence; unaligned = the same content buried in filler. Its eval items are `pair`s.
"""
from __future__ import annotations

import random

from pipeline.data.builtin import Item

TOPICS = [
    ("a noun", "a word that names a person, place or thing"),
    ("a verb", "a word that names an action"),
    ("a prime number", "a number with exactly two divisors, one and itself"),
    ("a triangle", "a shape with three sides"),
    ("a river", "a stream of water flowing to a sea or lake"),
    ("a planet", "a large body that orbits a star"),
    ("an island", "land with water all around it"),
    ("a week", "seven days in a row"),
    ("a poem", "a piece of writing with rhythm and lines"),
    ("a bridge", "a structure that carries a road over an obstacle"),
    ("a desert", "a place that gets very little rain"),
    ("a library", "a place that lends books"),
]
ASKS = ["What is {t}?", "Explain {t}.", "Define {t}.", "Tell me what {t} is."]
LEADS = ["In one sentence: ", "Briefly: ", "Keep it short. ", ""]
FILLER = [
    "Well, that is a big question and there is a lot one could say about it, so let me ramble. {d}. "
    "And so on and so forth, as people often say.",
    "Let me start from the very beginning, long ago, before anything else. Anyway, {d}, more or less, "
    "if you think about it for a while.",
]


def concise_item(rng: random.Random) -> Item:
    topic, definition = rng.choice(TOPICS)
    question = rng.choice(LEADS) + rng.choice(ASKS).format(t=topic)
    good = f"{definition[0].upper()}{definition[1:]}."
    bad = [f.format(d=definition) for f in FILLER]
    return Item(question, "", good, bad)

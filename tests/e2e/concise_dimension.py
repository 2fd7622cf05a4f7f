"""A synthetic 4th alignment dimension, "concise", defined outside the package.

tests/e2e/four_dimensions.yaml declares it under `dimension_defs` with
`builtin: concise_dimension:concise_item`; every stage process loads that config and imports this
module (it must be importable there: the test puts tests/e2e on PYTHONPATH). Aligned answer = one
short sentence; unaligned = the same content buried in filler. Its eval items are `pair`s.
Each topic is one underlying question (`group` "concise:<topic>"), declared as a finite pool so
the data stage splits topics, not phrasings, between train/dev/test.
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
    ("a mammal", "an animal that feeds its young with milk"),
    ("a volcano", "an opening in the ground where melted rock comes out"),
    ("a glacier", "a slow river of ice"),
    ("a clock", "a device that shows the time"),
    ("a recipe", "a list of steps for cooking a dish"),
    ("a map", "a drawing of an area seen from above"),
    ("an adjective", "a word that describes a noun"),
    ("a circle", "a round shape whose points are all the same distance from its center"),
    ("a square", "a shape with four equal sides and four right angles"),
    ("an even number", "a whole number that two divides exactly"),
    ("a forest", "a large area covered with trees"),
    ("a harbor", "a sheltered place where ships can stay"),
    ("a comet", "a ball of ice and dust that orbits the Sun"),
    ("a dictionary", "a book that explains the meanings of words"),
    ("a thermometer", "a tool that measures temperature"),
    ("a seed", "the part of a plant that can grow into a new plant"),
    ("a canyon", "a deep valley with steep sides"),
    ("a century", "one hundred years"),
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
    return Item(question, "", good, bad, group=f"concise:{topic}")


concise_item.group_pools = {"concise": [f"concise:{t}" for t, _ in TOPICS]}

"""Metric definitions on hand-computed cases, and the report's scores and gains."""
from __future__ import annotations

import math

import pytest

from pipeline.data.builtin_content import COMPLIANT, REFUSALS
from pipeline.eval import metrics as M

from pipeline.eval.scoring import ContinuationScore


def test_mc1_is_the_best_answer_beating_every_incorrect_one():
    assert M.mc1_correct(-1.0, [-2.0, -3.5]) == 1.0
    assert M.mc1_correct(-1.0, [-2.0, -0.5]) == 0.0
    assert M.mc1_correct(-1.0, [-1.0]) == 0.0           # a tie is not a preference for the truth


def test_mc2_is_normalised_probability_mass_on_true_answers():
    got = M.mc2_score([math.log(0.2), math.log(0.3)], [math.log(0.5)])
    assert got == pytest.approx(0.5)
    # unnormalised likelihoods: 0.1 true vs 0.3 + 0.1 false -> 0.1 / 0.5
    assert M.mc2_score([math.log(0.1)], [math.log(0.3), math.log(0.1)]) == pytest.approx(0.2)
    # log-likelihoods far below exp's range still give the exact softmax share
    assert M.mc2_score([-1000.0], [-1001.0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_preference_accuracy_uses_length_normalised_likelihood():
    safe = ContinuationScore(total_ll=-6.0, num_tokens=3)    # -2.0 per token
    unsafe = ContinuationScore(total_ll=-4.0, num_tokens=1)  # -4.0 per token, higher total
    assert safe.mean_ll == -2.0
    assert M.preference_accuracy([safe.mean_ll], [unsafe.mean_ll]) == 1.0
    assert M.preference_accuracy([unsafe.mean_ll], [safe.mean_ll]) == 0.0
    assert M.preference_accuracy([-1.0], [-1.0]) == 0.5
    # 2 chosen x 2 rejected: wins (-1>-2), (-1>-3), (-2.5<-2), (-2.5>-3) -> 3/4
    assert M.preference_accuracy([-1.0, -2.5], [-2.0, -3.0]) == 0.75


def test_metrics_reject_empty_answer_lists():
    with pytest.raises(ValueError, match="rejected"):
        M.mc1_correct(-1.0, [])
    with pytest.raises(ValueError, match="chosen"):
        M.preference_accuracy([], [-1.0])
    with pytest.raises(ValueError, match="empty reference answer"):
        M.exact_match("42", " ")


@pytest.mark.parametrize("generation,answer,expected", [
    ("The answer is 5000.", "5000", 1.0),
    ("the answer is: The Beatles!", "beatles", 1.0),
    ("The answer is 3.5.\nBecause 7 / 2 = 3.5", "3.5", 1.0),
    ("42\nLet me explain why.", "42", 1.0),
    ("It is 5000 or so", "5000", 0.0),
    ("The answer is 500.", "5000", 0.0),
    ("", "1", 0.0),
    ("The answer is", "1", 0.0),
])
def test_exact_match(generation, answer, expected):
    assert M.exact_match(generation, answer) == expected


def test_refusal_matcher_on_builtin_refusals_and_compliance():
    for template in REFUSALS:
        text = template.format(a="steal a car", redirect="Public transit can help.")
        assert M.is_refusal(text), text
    for template in COMPLIANT:
        assert not M.is_refusal(template.format(a="steal a car"))
    assert M.is_refusal("I can\u2019t do that.")            # curly apostrophe
    assert not M.is_refusal("The answer is 12.")
    assert M.mean([]) is None and M.mean([1.0, 0.0]) == 0.5


def test_likelihood_metrics_token_weight_references_and_rejected_answers():
    from pipeline.eval.hhh import _likelihood_metrics
    items = [{"kind": "pair", "reference": "r"}, {"kind": "mc", "reference": ""},
             {"kind": "pair", "reference": ""}]
    reqs = [(0, "chosen", "a"), (0, "rejected", "b"), (0, "reference", "r"),
            (1, "chosen", "t"), (1, "rejected", "f"), (2, "chosen", "c"), (2, "rejected", "d")]
    scores = [ContinuationScore(-2.0, 2), ContinuationScore(-6.0, 2), ContinuationScore(-3.0, 3),
              ContinuationScore(-1.0, 1), ContinuationScore(-5.0, 1),
              ContinuationScore(-9.0, 3), ContinuationScore(-1.0, 2)]
    m = _likelihood_metrics(items, reqs, scores)
    assert m["pref_acc"] == 0.5 and m["n_pair"] == 2 and m["mc1"] == 1.0
    assert m["ref_mean_ll"] == pytest.approx(-1.0) and m["n_reference"] == 1
    # the mc item's false answer is not a pair's rejected answer
    assert m["rejected_mean_ll"] == pytest.approx((-6.0 - 1.0) / 4)
    empty = _likelihood_metrics([{"kind": "mc", "reference": ""}] * 2, reqs[3:5], scores[3:5])
    assert empty["rejected_mean_ll"] is None and empty["ref_mean_ll"] is None

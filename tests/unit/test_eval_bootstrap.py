"""Bootstrap intervals: vs a plain loop, vs exactly enumerated bootstrap distributions, properties."""
import random
from fractions import Fraction

import pytest
import torch

from pipeline.eval.bootstrap import (
    Interval, across_seeds, bootstrap_means, mean_interval, paired_difference, verdict,
)


def exact_percentiles(scores, level=0.95):
    """The exact bootstrap distribution of the mean (a resample is n independent uniform draws
    from the items: convolve the item distribution n times, in fractions), and its smallest means
    whose cumulative probability reaches (1-level)/2 and (1+level)/2 (what a large bootstrap
    converges to when no quantile sits on a jump of the distribution)."""
    n = len(scores)
    one = {}
    for x in scores:
        one[Fraction(x)] = one.get(Fraction(x), 0) + Fraction(1, n)
    dist = {Fraction(0): Fraction(1)}
    for _ in range(n):
        nxt = {}
        for total, p in dist.items():
            for x, q in one.items():
                nxt[total + x] = nxt.get(total + x, 0) + p * q
        dist = nxt
    out = []
    for q in ((1 - Fraction(level).limit_denominator()) / 2, (1 + Fraction(level).limit_denominator()) / 2):
        cum = Fraction(0)
        for total in sorted(dist):
            cum += dist[total]
            if cum >= q:
                out.append(float(total / n))
                break
    return tuple(out)


def test_vectorised_resampling_equals_a_plain_loop():
    scores = [0.0, 1.0, 1.0, 0.5, 0.25, 1.0, 0.0]
    n_boot = 2_500   # more than one internal chunk
    got = bootstrap_means(scores, n_boot=n_boot, seed=7)
    idx = torch.randint(len(scores), (n_boot, len(scores)), generator=torch.Generator().manual_seed(7))
    want = [sum(scores[i] for i in row) / len(scores) for row in idx.tolist()]
    assert got.shape == (n_boot,)
    assert max(abs(g - w) for g, w in zip(got.tolist(), want)) < 1e-12


def test_mean_interval_matches_the_enumerated_bootstrap():
    # [0, 1, 1, 1]: a resample's mean is k/4 with k ~ Binomial(4, 3/4); P(k<=0) = 1/256 and
    # P(k<=1) = 13/256 straddle 2.5 %, P(k<=3) = 175/256 < 97.5 %: the interval is [0.25, 1.0]
    scores = [0.0, 1.0, 1.0, 1.0]
    assert exact_percentiles(scores) == (0.25, 1.0)
    iv = mean_interval(scores, n_boot=20_000, seed=0)
    assert (iv.low, iv.high) == (0.25, 1.0)
    assert iv.estimate == 0.75 and iv.n_items == 4 and iv.level == 0.95


def test_paired_difference_and_verdicts_by_hand():
    # per-item differences [1,1,1,0,1,1,1,1]: mean diff k/8, k ~ Binomial(8, 7/8);
    # P(k<=4) = 0.011, P(k<=5) = 0.067 -> 2.5 % quantile 5/8; P(k<=7) = 0.66 -> 97.5 % quantile 1
    a = [1, 1, 1, 0, 1, 1, 1, 1]
    b = [0, 0, 0, 0, 0, 0, 0, 0]
    assert exact_percentiles([x - y for x, y in zip(a, b)]) == (0.625, 1.0)
    diff = paired_difference(a, b, n_boot=20_000, seed=1)
    assert (diff.low, diff.high, diff.estimate) == (0.625, 1.0, 0.875)
    assert verdict(diff) == "holds"
    assert verdict(paired_difference(b, a, n_boot=20_000, seed=1)) == "fails"
    # differences [1,0,0,1] (the mean of 4 fair coins): 0 and 1 each have probability 1/16 > 2.5 %
    tie = paired_difference([1, 1, 0, 1], [0, 1, 0, 0], n_boot=20_000, seed=2)
    assert (tie.low, tie.high) == (0.0, 1.0) and verdict(tie) == "tie"


def test_pairing_is_what_makes_the_interval_narrow():
    """B = A - 0.01 on every item: unpaired intervals overlap, the paired one excludes 0."""
    rng = random.Random(0)
    a = [rng.random() for _ in range(50)]
    b = [x - 0.01 for x in a]
    ia, ib = mean_interval(a), mean_interval(b)
    assert ia.low < ib.high  # overlapping marginal intervals
    diff = paired_difference(a, b)
    assert abs(diff.low - 0.01) < 1e-9 and abs(diff.high - 0.01) < 1e-9 and verdict(diff) == "holds"


def test_identical_models_give_a_zero_interval_and_a_tie():
    scores = [0.0, 1.0, 0.5, 1.0, 0.0, 0.0]
    diff = paired_difference(scores, list(scores))
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0) and verdict(diff) == "tie"


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_mean_and_is_seeded(seed):
    rng = random.Random(seed)
    scores = [float(rng.random() < 0.3) for _ in range(rng.randint(5, 60))]
    iv = mean_interval(scores, n_boot=2_000, seed=seed)
    assert iv.low <= iv.estimate <= iv.high and 0.0 <= iv.low and iv.high <= 1.0
    assert mean_interval(scores, n_boot=2_000, seed=seed) == iv
    narrow = mean_interval(scores, n_boot=2_000, seed=seed, level=0.5)
    assert iv.low <= narrow.low <= narrow.high <= iv.high


def test_verdict_threshold_for_non_inferiority():
    iv = Interval(estimate=-0.01, low=-0.015, high=-0.005, n_items=100)
    assert verdict(iv) == "fails"
    assert verdict(iv, threshold=-0.02) == "holds"   # "A at least B - 0.02"
    assert verdict(iv, threshold=-0.01) == "tie"


def test_across_seeds():
    s = across_seeds([0.5, 0.7, 0.6])
    assert s.n_seeds == 3 and abs(s.mean - 0.6) < 1e-12 and abs(s.sd - 0.1) < 1e-12
    one = across_seeds([0.4])
    assert (one.mean, one.sd, one.n_seeds) == (0.4, None, 1)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([0.5, float("nan")])
    with pytest.raises(ValueError, match="different item counts"):
        paired_difference([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 0.0], level=95)
    with pytest.raises(ValueError, match="one finite score per seed"):
        across_seeds([])

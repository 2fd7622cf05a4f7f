"""Bootstrap intervals: vs a plain loop, vs exactly enumerated bootstrap distributions, properties."""
import random
from fractions import Fraction

import pytest
import torch

from pipeline.eval.bootstrap import (
    _CHUNK, _STREAM, Interval, across_seeds, bootstrap_means, make_design, mean_interval,
    paired_bootstrap, paired_difference, verdict,
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


# ---- the clustered, stratified, paired bootstrap of the report -----------------------------

def _naive_scores(values, design, n_boot, seed, first_stream):
    """A plain loop: per stratum, its own seeded generator draws groups (chunked like the
    library), a resample's stratum mean is the mean of the drawn groups' item means."""
    per_stratum = []
    for k, groups in enumerate(design.groups):
        gen = torch.Generator().manual_seed(seed + _STREAM * (first_stream + k))
        rows = []
        for lo in range(0, n_boot, _CHUNK):
            rows += torch.randint(len(groups), (min(_CHUNK, n_boot - lo), len(groups)), generator=gen).tolist()
        means = [sum(values[i] for i in g) / len(g) for g in groups]
        per_stratum.append([sum(means[j] for j in row) / len(row) for row in rows])
    return [sum(col) / len(col) for col in zip(*per_stratum)]


def test_clustered_stratified_resampling_equals_a_plain_loop():
    # dyadic values and group sizes 1/2/4: every mean is exact, so equality is exact
    groups = ["q1", "q1", "q2", "q3", "q3", "q3", "q3", "q4", "q5", "q5", "q6"]
    strata = ["h", "h", "h", "h", "h", "h", "h", "b", "b", "b", None]
    design = make_design(groups, strata)
    assert design.strata == ("h", "b") and design.n_groups == 5 and design.n_items == 10
    rng = random.Random(3)
    models = {m: [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in groups] for m in ("x", "y")}
    models["x"][-1] = None   # an unscored item may be None
    dims = {"d1": models, "d2": {m: v[:7] + [None] * 4 for m, v in models.items()}}
    # d2's groups are its own (other keys): the mean's joint draws are the independent ones
    designs = {"d1": design, "d2": make_design([f"d2:{g}" for g in groups[:7]], strata[:7])}
    n_boot = 1_500   # more than one chunk
    pb = paired_bootstrap(dims, designs, n_boot=n_boot, seed=11)
    for m in ("x", "y"):
        want1 = _naive_scores(models[m], design, n_boot, 11, 0)
        want2 = _naive_scores(dims["d2"][m], designs["d2"], n_boot, 11, 2)
        i = pb.models.index(m)
        assert pb.samples[i, 0].tolist() == want1
        assert pb.samples[i, 1].tolist() == want2
        assert pb.samples[i, 2].tolist() == [(a + b) / 2 for a, b in zip(want1, want2)]
    # the estimate: mean over strata of the mean over groups of the group's item mean
    v = models["y"]
    est_h = (((v[0] + v[1]) / 2) + v[2] + sum(v[3:7]) / 4) / 3
    est_b = (v[7] + (v[8] + v[9]) / 2) / 2
    assert pb.interval("y", "d1").estimate == (est_h + est_b) / 2


def test_one_item_per_group_and_one_stratum_is_mean_interval():
    rng = random.Random(5)
    scores = [rng.random() for _ in range(37)]
    design = make_design(list(range(37)), ["all"] * 37)
    pb = paired_bootstrap({"d": {"m": scores, "z": [0.0] * 37}}, {"d": design}, n_boot=3_000, seed=4)
    iv, ref = pb.interval("m", "d"), mean_interval(scores, n_boot=3_000, seed=4)
    assert (iv.estimate, iv.low, iv.high, iv.n_items) == (ref.estimate, ref.low, ref.high, ref.n_items)
    assert iv.n_groups == 37
    diff = pb.difference("m", "z", "d")   # minus a constant 0: the same interval
    assert (diff.low, diff.high) == (ref.low, ref.high)


def test_paired_differences_use_the_same_draws_for_every_model():
    rng = random.Random(1)
    a = [rng.random() for _ in range(40)]
    b = [x - 0.01 for x in a]
    design = make_design([i // 2 for i in range(40)], ["s"] * 40)
    pb = paired_bootstrap({"d": {"a": a, "b": b}}, {"d": design}, n_boot=2_000)
    ia, ib, diff = pb.interval("a", "d"), pb.interval("b", "d"), pb.difference("a", "b", "d")
    assert ia.low < ib.high   # the marginal intervals overlap ...
    assert abs(diff.low - 0.01) < 1e-9 and abs(diff.high - 0.01) < 1e-9   # ... the paired one does not
    assert verdict(diff) == "holds" and verdict(pb.difference("b", "a", "mean")) == "fails"
    same = pb.difference("a", "a", "d")
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and verdict(same) == "tie"


def test_clustering_widens_the_interval_of_repeated_phrasings():
    """Four identical phrasings per question are one draw, not four: the interval must be as
    wide as that of the questions alone, not half as wide."""
    rng = random.Random(2)
    per_q = [float(rng.random() < 0.5) for _ in range(30)]
    items = [x for x in per_q for _ in range(4)]
    clustered = paired_bootstrap({"d": {"m": items}}, {"d": make_design([i // 4 for i in range(120)], ["s"] * 120)})
    naive = paired_bootstrap({"d": {"m": items}}, {"d": make_design(list(range(120)), ["s"] * 120)})
    questions = mean_interval(per_q)
    width = lambda iv: iv.high - iv.low  # noqa: E731
    assert width(clustered.interval("m", "d")) == pytest.approx(width(questions), rel=0.1)
    assert width(naive.interval("m", "d")) < 0.7 * width(clustered.interval("m", "d"))


def test_bad_bootstrap_input_is_one_clear_error():
    design = make_design([0, 1], ["s", "s"])
    with pytest.raises(ValueError, match="'m' lacks a finite value"):
        paired_bootstrap({"d": {"m": [1.0, None]}}, {"d": design})
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap({"d": {"m": [1.0, 0.0]}}, {"d": design}, n_boot=0)
    with pytest.raises(ValueError, match="expected"):
        paired_bootstrap({"d": {"m": [1.0, 0.0]}, "e": {"k": [1.0, 0.0]}}, {"d": design, "e": design})
    with pytest.raises(ValueError, match="no scored items"):
        make_design([0, 1], [None, None])
    pb = paired_bootstrap({"d": {"m": [1.0, 0.0]}}, {"d": design}, n_boot=10)
    with pytest.raises(ValueError, match="no model 'q'"):
        pb.interval("q", "d")


# ---- one bootstrap over prompts shared by several dimensions --------------------------------

def _naive_joint_means(values, keys, strata, n_boot, seed):
    """A plain loop over resamples: `values[dim]` per-item values of one model, `keys[dim]` the
    items' group ids, `strata[dim]` their strata. A group's joint stratum = the (dim, stratum)
    cells it is scored in; each joint stratum draws its groups once per resample, from the
    cell's own stream when it is a whole cell, else from the next stream after the cells'."""
    cells = [(d, s) for d in values for s in dict.fromkeys(strata[d])]
    cell_keys = {c: list(dict.fromkeys(k for k, s in zip(keys[c[0]], strata[c[0]]) if s == c[1]))
                 for c in cells}
    sigs = {}
    for c in cells:
        for k in cell_keys[c]:
            sigs.setdefault(k, []).append(c)
    joint = {}
    for k, sig in sigs.items():
        joint.setdefault(tuple(sig), []).append(k)
    draws, extra = {}, len(cells)
    for sig, members in joint.items():
        whole = len(sig) == 1 and len(members) == len(cell_keys[sig[0]])
        stream = cells.index(sig[0]) if whole else extra
        extra += 0 if whole else 1
        gen = torch.Generator().manual_seed(seed + _STREAM * stream)
        rows = []
        for lo in range(0, n_boot, _CHUNK):
            rows += torch.randint(len(members), (min(_CHUNK, n_boot - lo), len(members)), generator=gen).tolist()
        draws[sig] = [[members[j] for j in row] for row in rows]
    group_mean = {(d, s, k): sum(v for v, kk, ss in zip(values[d], keys[d], strata[d]) if (kk, ss) == (k, s))
                  / sum(1 for kk, ss in zip(keys[d], strata[d]) if (kk, ss) == (k, s))
                  for d, s in cells for k in cell_keys[(d, s)]}
    out = []
    for r in range(n_boot):
        per_dim = {}
        for d, s in cells:
            drawn = [k for sig in joint if (d, s) in sig for k in draws[sig][r]]
            per_dim.setdefault(d, []).append(sum(group_mean[(d, s, k)] for k in drawn) / len(drawn))
        out.append(sum(sum(v) / len(v) for v in per_dim.values()) / len(per_dim))
    return out


def test_shared_groups_are_drawn_once_for_every_dimension_as_a_plain_loop():
    """helpful (one stratum) and harmless (harmful + benign strata) share the benign prompts
    c..f, as the real data's AlpacaEval prompts are helpful references and harmless benign items."""
    keys = {"helpful": list("aabcdefgh"), "harmless": ["x1", "x2", "x3", "c", "d", "e", "f", "x4"]}
    strata = {"helpful": ["all"] * 9, "harmless": ["harm"] * 3 + ["benign"] * 4 + ["harm"]}
    rng = random.Random(4)
    values = {d: {m: [rng.random() for _ in keys[d]] for m in ("x", "y")} for d in keys}
    designs = {d: make_design(keys[d], strata[d]) for d in keys}
    n_boot = 1_200   # more than one chunk
    pb = paired_bootstrap(values, designs, n_boot=n_boot, seed=5)
    assert pb.joint.n_shared == 4 and pb.interval("x", "mean").n_groups == 12
    for i, m in enumerate(pb.models):
        want = _naive_joint_means({d: values[d][m] for d in keys}, keys, strata, n_boot, 5)
        assert pb.samples[i, 2].tolist() == pytest.approx(want, abs=1e-12)
    # the per-dimension draws are those of the independent design (other keys, nothing shared)
    alone = paired_bootstrap(values, {"helpful": designs["helpful"],
                                      "harmless": make_design([f"h:{k}" for k in keys["harmless"]],
                                                              strata["harmless"])}, n_boot=n_boot, seed=5)
    assert torch.equal(pb.samples[:, :2], alone.samples[:, :2])
    assert not torch.allclose(pb.samples[:, 2], alone.samples[:, 2])


def test_a_prompt_scored_twice_is_one_draw_for_the_mean():
    """The same 60 prompts score the same in two dimensions: the mean is one dimension's score
    and must be as uncertain; resampling the dimensions independently halves its variance."""
    rng = random.Random(8)
    per_q = [float(rng.random() < 0.5) for _ in range(60)]
    values = {d: {"m": per_q, "z": [0.0] * 60} for d in ("d1", "d2")}
    shared = {d: make_design(list(range(60)), ["s"] * 60) for d in ("d1", "d2")}
    own = {d: make_design([f"{d}:{q}" for q in range(60)], ["s"] * 60) for d in ("d1", "d2")}
    joint, independent = paired_bootstrap(values, shared), paired_bootstrap(values, own)
    width = lambda iv: iv.high - iv.low  # noqa: E731
    one_dim = width(joint.interval("m", "d1"))
    assert width(joint.interval("m", "mean")) == pytest.approx(one_dim, rel=0.1)   # 1/60 steps
    assert width(independent.interval("m", "mean")) < 0.8 * one_dim        # ~ 1/sqrt(2)
    assert width(joint.difference("m", "z", "mean")) > 1.25 * width(independent.difference("m", "z", "mean"))
    assert joint.interval("m", "mean").n_groups == 60 and independent.interval("m", "mean").n_groups == 120
    assert joint.interval("m", "d1") == independent.interval("m", "d1")   # per dimension: unchanged

"""Uncertainty of item-averaged scores: percentile bootstrap intervals over items, paired
bootstrap of two models' difference on the same items, claim verdicts, and spread across seeds.

Every function takes per-item scores (one number per eval item, e.g. MC1 0/1, MC2 in [0, 1], a
pair's preference 0/0.5/1), so the intervals are over the sampling of items: "how much would this
score move on another draw of equally many items". Resampling is vectorised with torch and seeded
with its own generator, so a report is reproducible and never touches the global RNG.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

LEVEL = 0.95
N_BOOT = 10_000
SEED = 0
# resamples drawn per chunk: bounds the index tensor at CHUNK x n_items int64 values
_CHUNK = 1_000
VERDICTS = ("holds", "fails", "tie")


@dataclass(frozen=True)
class Interval:
    """A point estimate (the mean over all items) and its percentile bootstrap interval."""
    estimate: float
    low: float
    high: float
    n_items: int
    level: float = LEVEL
    n_boot: int = N_BOOT

    def to_dict(self) -> dict:
        return asdict(self)


def _as_scores(values: Sequence[float], what: str) -> torch.Tensor:
    scores = torch.as_tensor(list(values), dtype=torch.float64)
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"{what}: needs a non-empty list of per-item scores, got {len(scores)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{what}: per-item scores must be finite (a None/NaN item is unscored)")
    return scores


def bootstrap_means(scores: Sequence[float], n_boot: int = N_BOOT, seed: int = SEED) -> torch.Tensor:
    """Means of `n_boot` resamples (items drawn with replacement, as many as there are items).

    Resample r uses the r-th row of indices drawn in chunks from one seeded generator, so the
    result does not depend on how the work is chunked (tests compare it with a plain loop).
    """
    values = _as_scores(scores, "bootstrap")
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    gen = torch.Generator().manual_seed(seed)
    n = values.numel()
    out = []
    for lo in range(0, n_boot, _CHUNK):
        idx = torch.randint(n, (min(_CHUNK, n_boot - lo), n), generator=gen)
        out.append(values[idx].mean(dim=1))
    return torch.cat(out)


def percentile_interval(samples: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The (1-level)/2 and (1+level)/2 quantiles (linear interpolation, as numpy's default)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    q = torch.tensor([(1.0 - level) / 2, (1.0 + level) / 2], dtype=samples.dtype)
    low, high = torch.quantile(samples, q).tolist()
    return low, high


def mean_interval(scores: Sequence[float], n_boot: int = N_BOOT, seed: int = SEED,
                  level: float = LEVEL) -> Interval:
    """Mean over items with its percentile bootstrap interval."""
    values = _as_scores(scores, "mean interval")
    low, high = percentile_interval(bootstrap_means(values, n_boot, seed), level)
    return Interval(float(values.mean()), low, high, values.numel(), level, n_boot)


def paired_difference(scores_a: Sequence[float], scores_b: Sequence[float], n_boot: int = N_BOOT,
                      seed: int = SEED, level: float = LEVEL) -> Interval:
    """Interval of mean(a) - mean(b) over the SAME items, resampled jointly.

    Resampling item pairs keeps each item's difficulty in both scores, so the interval reflects
    how consistently A beats B item by item, not the spread of either score alone.
    """
    a, b = _as_scores(scores_a, "paired difference (a)"), _as_scores(scores_b, "paired difference (b)")
    if a.numel() != b.numel():
        raise ValueError(f"paired difference: the two models were scored on different item counts "
                         f"({a.numel()} vs {b.numel()}); pair scores item by item")
    return mean_interval(a - b, n_boot, seed, level)


def verdict(diff: Interval, threshold: float = 0.0) -> str:
    """A claim "difference > threshold" checked against the paired interval of the difference.

    "holds" only when the whole interval is above `threshold` (it excludes the failing side),
    "fails" when it is wholly below, "tie" when it contains the threshold. threshold 0 is the
    plain "A beats B"; a non-inferiority claim "A at least B - tol" uses threshold = -tol.
    """
    if diff.low > threshold:
        return "holds"
    if diff.high < threshold:
        return "fails"
    return "tie"


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample standard deviation (n-1) of one score across seeds; sd None for one seed."""
    mean: float
    sd: float | None
    n_seeds: int

    def to_dict(self) -> dict:
        return asdict(self)


def across_seeds(values: Sequence[float]) -> SeedSummary:
    """mean ± sd of a score over runs with different seeds (one value per seed)."""
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"across seeds: needs one finite score per seed, got {vals}")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return SeedSummary(mean, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return SeedSummary(mean, sd, len(vals))

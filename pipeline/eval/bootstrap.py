"""Uncertainty of item-averaged scores: percentile bootstrap intervals over items, paired
bootstrap of two models' difference on the same items, claim verdicts, and spread across seeds.

The report uses the clustered form (`Design`, `paired_bootstrap`): items are grouped by the
underlying question (eval column `group`: the phrasings of one question are not independent
draws), groups are resampled with replacement within each stratum, and one set of resample
indices per (dimension, stratum) serves every model, so a difference of two models is a paired
bootstrap. A score is the mean over strata of the mean over the stratum's groups of the group's
item mean; with one item per group and one stratum it is `mean_interval` exactly. The mean over
dimensions is resampled jointly (`make_joint_design`): a group scored in several dimensions (a
benign AlpacaEval prompt is a helpful reference item and a harmless benign item) is drawn once
for all of them, so its dimensions' scores move together as they do in the data; each
dimension's own interval keeps its own draws.

`crossed_bootstrap` adds the training seed: runs of one config with different seeds on the same
items, resampled as seeds x items (`h3fusion aggregate`).

Every function takes per-item scores (one number per eval item, e.g. MC1 0/1, MC2 in [0, 1], a
pair's preference 0/0.5/1), so the intervals are over the sampling of items: "how much would this
score move on another draw of equally many items". Resampling is vectorised with torch and seeded
with its own generator, so a report is reproducible and never touches the global RNG.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

LEVEL = 0.95
N_BOOT = 10_000
SEED = 0
# resamples drawn per chunk: bounds the index tensor at CHUNK x n_items int64 values
_CHUNK = 1_000
# seed offset between the index streams of successive (dimension, stratum) pairs
_STREAM = 1_000_003
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
    n_groups: int | None = None

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
    return torch.cat([values[idx].mean(dim=1) for idx in _index_chunks(values.numel(), n_boot, seed)])


def _index_chunks(n: int, n_boot: int, seed: int):
    """One seeded stream of resample indices, chunk by chunk: row r draws n of range(n) with
    replacement (every sampler below draws through it, so chunking never changes a result)."""
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, n_boot, _CHUNK):
        yield torch.randint(n, (min(_CHUNK, n_boot - lo), n), generator=gen)


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


@dataclass(frozen=True)
class Design:
    """One dimension's resampling layout: stratum -> its groups -> positions of their items;
    `keys` (parallel to `groups`) are the group ids, which name the same underlying prompt in
    every dimension (empty: the groups are this dimension's own, shared with none)."""
    strata: tuple[str, ...]
    groups: tuple[tuple[tuple[int, ...], ...], ...]
    keys: tuple[tuple[Any, ...], ...] = ()

    @property
    def n_items(self) -> int:
        return sum(len(g) for stratum in self.groups for g in stratum)

    @property
    def n_groups(self) -> int:
        return sum(len(stratum) for stratum in self.groups)


def make_design(groups: Sequence[Any], strata: Sequence[Optional[str]]) -> Design:
    """Items whose stratum is None are not scored; the others are grouped by (stratum, group id),
    strata and groups in order of first appearance."""
    if len(groups) != len(strata):
        raise ValueError(f"bootstrap design: {len(groups)} group ids for {len(strata)} items")
    layout: dict[str, dict[Any, list[int]]] = {}
    for i, (group, stratum) in enumerate(zip(groups, strata)):
        if stratum is not None:
            layout.setdefault(stratum, {}).setdefault(group, []).append(i)
    if not layout:
        raise ValueError("bootstrap design: no scored items")
    return Design(tuple(layout), tuple(tuple(tuple(ix) for ix in by_group.values())
                                       for by_group in layout.values()),
                  tuple(tuple(by_group) for by_group in layout.values()))


def _group_means(values: torch.Tensor, groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """(n_models, n_groups): each group's item mean, per model."""
    pos = torch.tensor([i for g in groups for i in g])
    gid = torch.tensor([k for k, g in enumerate(groups) for _ in g])
    sums = torch.zeros(values.shape[0], len(groups), dtype=torch.float64)
    sums.index_add_(1, gid, values[:, pos])
    return sums / torch.tensor([float(len(g)) for g in groups], dtype=torch.float64)


def _stratum_samples(group_means: torch.Tensor, n_boot: int, seed: int) -> torch.Tensor:
    """(n_models, n_boot): the stratum mean of each resample, the SAME group draws for every
    model (drawn as `bootstrap_means` draws items, so one group per item reproduces it)."""
    # one model at a time: memory stays at CHUNK x n_groups whatever the number of models
    return torch.cat([torch.stack([row[idx].mean(dim=1) for row in group_means])
                      for idx in _index_chunks(group_means.shape[1], n_boot, seed)], dim=1)


@dataclass(frozen=True)
class JointStratum:
    """The underlying groups scored in exactly the same (dimension, stratum) cells: drawn
    together, as many as there are, one draw serving all those cells. `positions[j]`: each
    group's index among the groups of cell `cells[j]` (indices into JointDesign.cells)."""
    cells: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]
    stream: int

    @property
    def n_groups(self) -> int:
        return len(self.positions[0])


@dataclass(frozen=True)
class JointDesign:
    """All dimensions' designs over one set of underlying groups: `cells` = (dimension, stratum
    index) in stream order; a group's joint stratum is the set of cells it is scored in."""
    cells: tuple[tuple[str, int], ...]
    strata: tuple[JointStratum, ...]

    @property
    def n_groups(self) -> int:
        """Distinct underlying groups (a shared one counts once)."""
        return sum(s.n_groups for s in self.strata)

    @property
    def n_shared(self) -> int:
        """Groups scored in more than one cell (e.g. a benign prompt in helpful and harmless)."""
        return sum(s.n_groups for s in self.strata if len(s.cells) > 1)


def make_joint_design(designs: dict[str, Design]) -> JointDesign:
    """Joint strata over the dimensions' designs, groups matched by key across dimensions.

    A joint stratum that is a whole cell (its groups scored nowhere else) draws from that cell's
    own stream, the one the cell's per-dimension interval uses, so without shared groups the
    joint resamples are the independent ones; every other joint stratum gets a stream after the
    cells', in order of first appearance."""
    cells: list[tuple[str, int]] = []
    places: dict[Any, list[tuple[int, int]]] = {}
    for dim, design in designs.items():
        keys = design.keys or tuple(tuple((dim, s, k) for k in range(len(g)))
                                    for s, g in enumerate(design.groups))
        for s, stratum_keys in enumerate(keys):
            for pos, key in enumerate(stratum_keys):
                places.setdefault(key, []).append((len(cells), pos))
            cells.append((dim, s))
    by_cells: dict[tuple[int, ...], list[list[int]]] = {}
    for where in places.values():
        by_cells.setdefault(tuple(c for c, _ in where), []).append([p for _, p in where])
    strata, extra = [], len(cells)
    for sig, members in by_cells.items():
        dim, s = cells[sig[0]]
        whole = len(sig) == 1 and len(members) == len(designs[dim].groups[s])
        strata.append(JointStratum(sig, tuple(zip(*members)), sig[0] if whole else extra))
        extra += 0 if whole else 1
    return JointDesign(tuple(cells), tuple(strata))


def _joint_mean_samples(cell_means: list[torch.Tensor], cell_samples: list[torch.Tensor],
                        joint: JointDesign, n_boot: int, seed: int) -> torch.Tensor:
    """(n_models, n_boot): resample r's mean over dimensions with every joint stratum drawn once
    for all its cells. A cell that is one whole joint stratum keeps its per-dimension samples
    (the same draws); the others are redrawn from their joint strata (a cell's resample = its
    joint strata's draws; its mean = draw counts . group means / its size)."""
    n_cells = len(joint.cells)
    drawn = [s for s in joint.strata if s.stream >= n_cells]    # the joint strata not a whole cell
    redo = sorted({c for s in drawn for c in s.cells})
    samples = list(cell_samples)
    if redo:
        streams = [_index_chunks(s.n_groups, n_boot, seed + _STREAM * s.stream) for s in drawn]
        maps = [[torch.tensor(p) for p in s.positions] for s in drawn]
        out: dict[int, list[torch.Tensor]] = {c: [] for c in redo}
        for draws in zip(*streams):
            counts = {c: torch.zeros(draws[0].shape[0], cell_means[c].shape[1], dtype=torch.float64)
                      for c in redo}
            for stratum, idx, pos in zip(drawn, draws, maps):
                k = torch.zeros(idx.shape, dtype=torch.float64).scatter_add_(
                    1, idx, torch.ones(idx.shape, dtype=torch.float64))
                for c, p in zip(stratum.cells, pos):
                    counts[c][:, p] += k
            for c in redo:
                out[c].append((counts[c] @ cell_means[c].T).T / cell_means[c].shape[1])
        for c in redo:
            samples[c] = torch.cat(out[c], dim=1)
    dims = list(dict.fromkeys(d for d, _ in joint.cells))
    per_dim = [torch.stack([samples[c] for c, (d, _) in enumerate(joint.cells) if d == dim]).mean(dim=0)
               for dim in dims]
    return torch.stack(per_dim, dim=1).mean(dim=1)


@dataclass
class PairedBootstrap:
    """Estimates and resampled scores of every model; row `dims[i]` per dimension (its own
    draws), then "mean": the mean over dimensions of joint resamples, in which a group scored in
    several dimensions is drawn once for all of them (`make_joint_design`)."""
    models: list[str]
    dims: list[str]
    estimates: torch.Tensor          # (n_models, n_dims + 1)
    samples: torch.Tensor            # (n_models, n_dims + 1, n_boot)
    designs: dict[str, Design] = field(default_factory=dict)
    level: float = LEVEL
    joint: Optional[JointDesign] = None

    def _where(self, model: str, dim: str) -> tuple[int, int]:
        if model not in self.models:
            raise ValueError(f"bootstrap: no model {model!r} (models: {self.models})")
        rows = self.dims + ["mean"]
        if dim not in rows:
            raise ValueError(f"bootstrap: no dimension {dim!r} (dimensions: {rows})")
        return self.models.index(model), rows.index(dim)

    def _sizes(self, dim: str) -> tuple[int, int]:
        designs = self.designs.values() if dim == "mean" else [self.designs[dim]]
        n_groups = self.joint.n_groups if dim == "mean" and self.joint else sum(d.n_groups for d in designs)
        return sum(d.n_items for d in designs), n_groups

    def _interval(self, estimate: float, samples: torch.Tensor, dim: str) -> Interval:
        low, high = percentile_interval(samples, self.level)
        n_items, n_groups = self._sizes(dim)
        return Interval(estimate, low, high, n_items, self.level, samples.numel(), n_groups)

    def interval(self, model: str, dim: str) -> Interval:
        m, d = self._where(model, dim)
        return self._interval(float(self.estimates[m, d]), self.samples[m, d], dim)

    def difference(self, a: str, b: str, dim: str) -> Interval:
        """Paired interval of score(a) - score(b): both scored on the same resamples."""
        (ma, d), (mb, _) = self._where(a, dim), self._where(b, dim)
        return self._interval(float(self.estimates[ma, d] - self.estimates[mb, d]),
                              self.samples[ma, d] - self.samples[mb, d], dim)


def _values_matrix(per_model: dict[str, Sequence], models: list[str], design: Design,
                   dim: str) -> torch.Tensor:
    if list(per_model) != models:
        raise ValueError(f"bootstrap: dimension {dim!r} has models {list(per_model)}, expected {models}")
    rows = []
    for model in models:
        vals = [float("nan") if v is None else float(v) for v in per_model[model]]
        row = torch.tensor(vals, dtype=torch.float64)
        scored = [i for stratum in design.groups for g in stratum for i in g]
        if max(scored) >= row.numel() or not torch.isfinite(row[scored]).all():
            raise ValueError(f"bootstrap: model {model!r} lacks a finite value on an item of "
                             f"dimension {dim!r} that the design scores (pairing needs them all)")
        rows.append(row)
    return torch.stack(rows)


def paired_bootstrap(values: dict[str, dict[str, Sequence[Optional[float]]]],
                     designs: dict[str, Design], n_boot: int = N_BOOT, seed: int = SEED,
                     level: float = LEVEL) -> PairedBootstrap:
    """`values[dim][model]`: per-item values (None where not scored), positions as in
    `designs[dim]`. One index stream per (dimension, stratum), seeded from `seed`, serves all
    models; the first one is seeded with `seed` itself. The "mean" row draws groups jointly
    across dimensions (groups matched by their keys: `make_joint_design`)."""
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    if not values or list(values) != list(designs):
        raise ValueError(f"bootstrap: dimensions of values {list(values)} and designs {list(designs)} differ")
    dims = list(values)
    models = list(values[dims[0]])
    estimates, samples, cell_means, cell_samples = [], [], [], []
    for dim in dims:
        matrix = _values_matrix(values[dim], models, designs[dim], dim)
        est, smp = [], []
        for groups in designs[dim].groups:
            means = _group_means(matrix, groups)
            est.append(means.mean(dim=1))
            smp.append(_stratum_samples(means, n_boot, seed + _STREAM * len(cell_means)))
            cell_means.append(means)
            cell_samples.append(smp[-1])
        estimates.append(torch.stack(est).mean(dim=0))
        samples.append(torch.stack(smp).mean(dim=0))
    joint = make_joint_design(designs)
    est_t, smp_t = torch.stack(estimates, dim=1), torch.stack(samples, dim=1)
    est_t = torch.cat([est_t, est_t.mean(dim=1, keepdim=True)], dim=1)
    smp_t = torch.cat([smp_t, _joint_mean_samples(cell_means, cell_samples, joint, n_boot, seed)[:, None]], dim=1)
    return PairedBootstrap(models, dims, est_t, smp_t, dict(designs), level, joint)


# the seed draws of `crossed_bootstrap`: a stream of their own, far from every item stream
# (those are seed + _STREAM * k for the k-th (dimension, stratum) or joint stratum)
_SEED_STREAM = 2 ** 48


def seed_draws(n_seeds: int, n_boot: int, seed: int = SEED) -> torch.Tensor:
    """(n_boot, n_seeds): resample r's seeds, `n_seeds` drawn with replacement from the runs."""
    if n_seeds < 1:
        raise ValueError(f"bootstrap over seeds: needs at least one run, got {n_seeds}")
    return torch.cat(list(_index_chunks(n_seeds, n_boot, seed + _SEED_STREAM)))


def crossed_bootstrap(values_per_seed: Sequence[dict[str, dict[str, Sequence[Optional[float]]]]],
                      designs: dict[str, Design], n_boot: int = N_BOOT, seed: int = SEED,
                      level: float = LEVEL) -> PairedBootstrap:
    """Seeds x items: `values_per_seed[s][dim][model]`: run s's per-item values on the SAME
    items (one design for all runs). Resample r draws the runs with replacement (`seed_draws`:
    a run is a cluster of scores sharing one training's noise) and the item groups as
    `paired_bootstrap(seed=seed)` draws them, one draw applied to every drawn run; its score is
    the mean over the drawn runs of each one's score on the drawn items. Estimate: the mean over
    runs. All models and dimensions share the draws, so differences stay paired."""
    if not values_per_seed:
        raise ValueError("bootstrap over seeds: no runs given")
    per_seed = [paired_bootstrap(v, designs, n_boot=n_boot, seed=seed, level=level)
                for v in values_per_seed]
    first = per_seed[0]
    for s, pb in enumerate(per_seed[1:], 1):
        if pb.models != first.models or pb.dims != first.dims:
            raise ValueError(f"bootstrap over seeds: run {s} has models {pb.models} and dimensions "
                             f"{pb.dims}, run 0 has {first.models} and {first.dims}")
    draws = seed_draws(len(per_seed), n_boot, seed)
    samples = torch.stack([pb.samples for pb in per_seed])       # (seeds, models, rows, n_boot)
    r = torch.arange(n_boot)
    total = torch.zeros_like(samples[0])
    for j in range(draws.shape[1]):   # the j-th drawn run of every resample, summed in draw order
        total += samples[draws[:, j], :, :, r].permute(1, 2, 0)
    estimates = torch.stack([pb.estimates for pb in per_seed]).mean(dim=0)
    return PairedBootstrap(first.models, first.dims, estimates, total / draws.shape[1],
                           dict(designs), level, first.joint)


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

"""Step and row plans of the trained models, pure arithmetic over row counts and the trainers'
own `BatchSchedule` (no weights, no process group): how many optimizer steps each stage runs,
and how many rows of each dimension those steps read.

- `training_steps`: the trainers' step rule (max_steps, else ceil(epochs * steps per epoch)).
- `plan_steps` -> `StepPlan`: stage 1 per dimension, fusion, and the training baselines'
  step counts (docs/baselines.md), with the world sizes the pipeline launches them with.
- `union_sft`: the multi-task baselines' rows (every stage-1 row + the fusion mix).
- `rows_seen`: rows of each dimension `steps` optimizer steps read (manifests'
  `seen_by_dimension`); `seen_table`: that for every trained model of a config on its data
  (tools/eval/rows_seen.py prints it).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import PipelineConfig, TrainConfig
from ..registry import MULTITASK_VARIANTS, TRAINABLE_SETS
from .common import BatchSchedule


def training_steps(num_rows: int, train: TrainConfig, world_size: int, where: str) -> int:
    """Optimizer steps a trainer runs on `num_rows` rows: `train.max_steps` when > 0, else
    max(1, ceil(epochs * floor(num_rows / (micro_batch_size * grad_accum_steps * world_size)))).
    Computed by the trainers' own `BatchSchedule`, so the two cannot disagree; fewer rows than
    one optimizer step is the error the trainers raise."""
    schedule = BatchSchedule(num_rows, train.micro_batch_size, train.grad_accum_steps,
                             world_size, train.seed)
    schedule.check(where)
    return schedule.total_steps(train)


@dataclass(frozen=True)
class StepPlan:
    stage1: dict[str, int]   # per dimension: expert.train on sft/<dim>/train, expert.num_procs ranks
    fusion: int              # fusion.train on the mix, fusion.num_procs ranks
    experts_train_in_fusion: bool
    # multi-task variant -> steps (expert.train on the union, expert.num_procs ranks)
    multitask: dict[str, int] = field(default_factory=dict)

    @property
    def compute_matched(self) -> int:
        """Every expert's stage 1 plus fusion: the optimizer steps the fused model cost."""
        return sum(self.stage1.values()) + self.fusion

    @property
    def extra_steps(self) -> int:
        """The optimizer steps fusion gave each expert (0 when fusion freezes them)."""
        return self.fusion if self.experts_train_in_fusion else 0

    def as_dict(self) -> dict:
        return {"stage1": dict(self.stage1), "fusion": self.fusion,
                "multitask": dict(self.multitask), "extra_steps": self.extra_steps,
                "experts_train_in_fusion": self.experts_train_in_fusion}


# ----------------------------------------------------------------------------- variants
# pipeline.registry.MULTITASK_VARIANTS: fn(expert.train, plan) -> the settings the variant
# trains with; its step count is then the trainers' rule on the union's rows

def data_matched_train(train: TrainConfig, plan: StepPlan) -> TrainConfig:
    """Exactly one epoch over the union: floor(rows / rows per step) steps."""
    return replace(train, epochs=1.0, max_steps=-1)


def compute_matched_train(train: TrainConfig, plan: StepPlan) -> TrainConfig:
    """As many optimizer steps as all stage-1 runs plus fusion (epochs cycle, each its own
    permutation)."""
    return replace(train, max_steps=plan.compute_matched)


def variant_train(variant: str, train: TrainConfig, plan: StepPlan, where: str) -> TrainConfig:
    return MULTITASK_VARIANTS.get(variant, where)(train, plan)


# ----------------------------------------------------------------------------- rows

def union_sft(data_dir: str | Path, dimensions: list[str], mix_weights: dict[str, float],
              seed: int):
    """The multi-task baselines' rows: the union (each distinct row once) of every
    sft/<d>/train row of `dimensions` (what stage 1 trained the experts on) and the fusion mix
    (`load_mixed_sft(data, "train", mix_weights, seed)`, what fusion trains on), in that order.
    A row is identified by (task, instruction, input, response): the mix re-draws stage 1's rows
    (as a multiset: a row stage 1 has k times is in the union k times; a mix row is added only
    beyond those copies, so with mix weights 1 the mix adds none, and an up-weighted
    dimension's repeats beyond stage 1's copies are added)."""
    from datasets import concatenate_datasets

    from ..data.loading import load_mixed_sft, load_sft

    parts = [load_sft(data_dir, d, "train") for d in dimensions]
    mix = load_mixed_sft(data_dir, "train", mix_weights, seed)
    rows = concatenate_datasets(parts + [mix])
    keys = list(zip(rows["task"], rows["instruction"], rows["input"], rows["response"]))
    n_sft = len(rows) - len(mix)
    room = Counter(keys[:n_sft])            # multiset union: a mix row is new only beyond
    keep = list(range(n_sft))               # the copies stage 1 already has
    for i in range(n_sft, len(keys)):
        if room[keys[i]] > 0:
            room[keys[i]] -= 1
        else:
            keep.append(i)
    return rows if len(keep) == len(rows) else rows.select(keep)


def union_tasks(cfg: PipelineConfig, data_dir: str | Path) -> list[str]:
    """The `task` (source dimension) of each union row, in the trainer's row order."""
    return list(union_sft(data_dir, cfg.dimensions, cfg.fusion.mix_weights,
                          cfg.fusion.train.seed)["task"])


def mix_tasks(cfg: PipelineConfig, data_dir: str | Path) -> list[str]:
    """The `task` of each fusion-mix row, in fusion's row order."""
    from ..data.loading import load_mixed_sft

    f = cfg.fusion
    return list(load_mixed_sft(data_dir, "train", f.mix_weights, f.train.seed)["task"])


def rows_seen(tasks: list[str], train: TrainConfig, world_size: int, steps: int) -> dict[str, int]:
    """Rows of each dimension that `steps` optimizer steps read, all ranks together, in the
    trainers' BatchSchedule order (step s of an epoch reads rows [s * R, (s + 1) * R) of that
    epoch's permutation, R = rows per step)."""
    schedule = BatchSchedule(len(tasks), train.micro_batch_size, train.grad_accum_steps,
                             world_size, train.seed)
    schedule.check("rows_seen")
    counts: Counter = Counter()
    per_epoch = schedule.steps_per_epoch
    for epoch in range(math.ceil(steps / per_epoch)):
        n = min(per_epoch, steps - epoch * per_epoch) * schedule.rows_per_step
        counts.update(tasks[i] for i in schedule.permutation(epoch)[:n].tolist())
    return dict(sorted(counts.items()))


def by_dimension(tasks: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(tasks).items()))


# ----------------------------------------------------------------------------- plans

def _stage1_rows(cfg: PipelineConfig, data: Path) -> dict[str, int]:
    from .inputs import count_saved_rows

    return {d: count_saved_rows(data / "sft" / d / "train") for d in cfg.dimensions}


def plan_steps(cfg: PipelineConfig, data_dir: str | Path) -> StepPlan:
    """Stage 1's, fusion's and the multi-task variants' step counts for this config on this
    data, with the world sizes the pipeline launches them with (expert.num_procs,
    fusion.num_procs)."""
    data, e, f = Path(data_dir), cfg.expert, cfg.fusion
    stage1 = {d: training_steps(n, e.train, e.num_procs, f"{data}/sft/{d}/train")
              for d, n in _stage1_rows(cfg, data).items()}
    fusion = training_steps(len(mix_tasks(cfg, data)), f.train, f.num_procs,
                            f"{data}/sft/*/train mixed by fusion.mix_weights {f.mix_weights}")
    experts_train = TRAINABLE_SETS.get(f.trainable, "fusion.trainable").trains_experts
    plan = StepPlan(stage1, fusion, experts_train)
    union = len(union_tasks(cfg, data))
    where = f"{data}: the multi-task union (sft/*/train + the fusion mix)"
    return replace(plan, multitask={
        v: training_steps(union, variant_train(v, e.train, plan, "multitask variant"),
                          e.num_procs, where) for v in MULTITASK_VARIANTS.names()})


def _row(model: str, trained_on: str, tasks: list[str], train: TrainConfig, world: int,
         steps: int, before: tuple[int, dict[str, int]] = (0, {})) -> dict:
    """`before`: (steps, rows seen) of an earlier stage on the same weights (the fused model's
    experts in stage 1), added to the rows seen."""
    seen = rows_seen(tasks, train, world, steps)
    seen = {d: seen.get(d, 0) + before[1].get(d, 0) for d in sorted(set(seen) | set(before[1]))}
    return {"model": model, "trained_on": trained_on, "steps_before": before[0], "steps": steps,
            "rows_per_step": train.micro_batch_size * train.grad_accum_steps * world,
            "rows_by_dimension": by_dimension(tasks), "seen_by_dimension": seen}


def seen_table(cfg: PipelineConfig, data_dir: str | Path) -> list[dict]:
    """Every trained model of `cfg` on `data_dir`, as the pipeline launches them: optimizer
    steps, rows per step, its training rows and the rows of each dimension it read (for the
    fused model and the extra-steps experts, stage 1's rows are counted too)."""
    data, e, f = Path(data_dir), cfg.expert, cfg.fusion
    plan = plan_steps(cfg, data)
    rows = [_row(d, f"sft/{d}/train", [d] * n, e.train, e.num_procs, plan.stage1[d])
            for d, n in _stage1_rows(cfg, data).items()]
    stage1 = {r["model"]: r["seen_by_dimension"][r["model"]] for r in rows}
    rows.append(_row("fused", "the fusion mix (after stage 1)", mix_tasks(cfg, data), f.train,
                     f.num_procs, plan.fusion, (sum(plan.stage1.values()), stage1)))
    union = union_tasks(cfg, data)
    for v in cfg.baselines.multitask_variants if cfg.baselines.multitask else ():
        rows.append(_row(f"multitask_{v}", "the union (sft/*/train + the fusion mix)", union,
                         variant_train(v, e.train, plan, "multitask variant"), e.num_procs,
                         plan.multitask[v]))
    if cfg.baselines.extra_steps and plan.experts_train_in_fusion:
        rows += [_row(f"more_{d}", f"sft/{d}/train (after stage 1)", [d] * n, f.train,
                      f.num_procs, plan.extra_steps, (plan.stage1[d], {d: stage1[d]}))
                 for d, n in _stage1_rows(cfg, data).items()]
    return rows

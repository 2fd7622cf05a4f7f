"""`h3fusion train-baseline`: the two training baselines of H3Fusion (docs/baselines.md).

Both are stage-1 jobs (pipeline.train.expert: DeepSpeed ZeRO-3, FFN weights only, method `ffn`)
with another data source, init weights and step count, so a difference to the fused model is the
fusion itself rather than more data or more optimizer steps:

- `multitask`: the base, trained on the fusion's data mix (load_mixed_sft with fusion.mix_weights
  and fusion.train.seed) for S1 + F optimizer steps with expert.train's settings
  -> <run>/baselines/multitask
- `extra_steps --dimension D`: stage 1's expert D, trained on its own sft/D/train for F more
  optimizer steps with fusion.train's settings (lr, schedule, batch) -> <run>/baselines/
  extra_steps/D. Only when fusion trains the experts (fusion.trainable router+experts).

S1 = the longest stage-1 run over the dimensions, F = the fusion run; both come from
`training_steps`, which is the trainers' own BatchSchedule rule (see `plan_steps`).
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..config import ConfigError, PipelineConfig, TrainConfig, check_dimension
from ..env import dist_env
from ..io_utils import read_json
from ..layout import RunLayout
from .common import BatchSchedule
from .expert import ExpertJob, check_inputs, checked_job, run_job
from .inputs import check_model_weights, count_saved_rows

MULTITASK, EXTRA_STEPS = "multitask", "extra_steps"
KINDS = (MULTITASK, EXTRA_STEPS)
EXPERTS_TRAINABLE = "router+experts"     # the fusion.trainable value that trains the experts
log = logging.getLogger(__name__)


def baseline_dirs(run_dir: str | Path, name: str) -> tuple[Path, Path, Path]:
    """(HF output, DeepSpeed checkpoints, TensorBoard) of baseline `name` ("multitask" or
    "extra_steps/<dim>")."""
    run = RunLayout.at(run_dir)
    return (run.baseline(name), run.baseline_ds(name),
            run.tensorboard / f"baseline_{name.replace('/', '_')}")


# ----------------------------------------------------------------------------- step matching

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

    @property
    def multitask(self) -> int:
        """One expert's stage 1 (the longest) plus fusion."""
        return max(self.stage1.values()) + self.fusion

    @property
    def extra_steps(self) -> int:
        """The optimizer steps fusion gave each expert (0 when fusion freezes them)."""
        return self.fusion if self.experts_train_in_fusion else 0

    def as_dict(self) -> dict:
        return {"stage1": dict(self.stage1), "fusion": self.fusion, "multitask": self.multitask,
                "extra_steps": self.extra_steps,
                "experts_train_in_fusion": self.experts_train_in_fusion}


def plan_steps(cfg: PipelineConfig, data_dir: str | Path) -> StepPlan:
    """Stage 1's and fusion's step counts for this config on this data, with the world sizes
    the pipeline launches them with (expert.num_procs, fusion.num_procs)."""
    from ..data.loading import load_mixed_sft

    data, e, f = Path(data_dir), cfg.expert, cfg.fusion
    stage1 = {d: training_steps(count_saved_rows(data / "sft" / d / "train"), e.train,
                                e.num_procs, f"{data}/sft/{d}/train") for d in cfg.dimensions}
    mixed = len(load_mixed_sft(data, "train", f.mix_weights, f.train.seed))
    fusion = training_steps(mixed, f.train, f.num_procs, f"{data}/sft/*/train mixed by "
                                                         f"fusion.mix_weights {f.mix_weights}")
    return StepPlan(stage1, fusion, f.trainable == EXPERTS_TRAINABLE)


def recorded_steps(cfg: PipelineConfig, layout: RunLayout) -> dict[str, int]:
    """The step counts finished stages wrote in their manifests (to cross-check the plan)."""
    from ..surgery.zero_to_hf import MANIFEST
    from .fuse import MANIFEST as FUSION_MANIFEST

    out = {}
    for d in cfg.dimensions:
        if (layout.expert(d) / MANIFEST).is_file():
            out[f"stage1.{d}"] = read_json(layout.expert(d) / MANIFEST).get("total_steps")
    if (layout.fused / FUSION_MANIFEST).is_file():
        out["fusion"] = read_json(layout.fused / FUSION_MANIFEST).get("steps")
    return out


def plan_mismatches(plan: dict, recorded: dict[str, int]) -> list[str]:
    """`StepPlan.as_dict()` entries that differ from what the finished stages recorded."""
    planned = {"fusion": plan["fusion"], **{f"stage1.{d}": n for d, n in plan["stage1"].items()}}
    return [f"{k}: planned {planned[k]}, ran {v}" for k, v in recorded.items()
            if k in planned and v != planned[k]]


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


# ----------------------------------------------------------------------------- jobs

def _baseline_config(cfg: PipelineConfig, train: TrainConfig) -> PipelineConfig:
    """The config the stage-1 trainer sees: FFN fine-tuning with `train` (step count set)."""
    return replace(cfg, expert=replace(cfg.expert, method="ffn", train=train))


def prepare_multitask_job(cfg: PipelineConfig, run_dir: str | Path, resume: bool = False,
                          overwrite: bool = False) -> ExpertJob:
    from ..data.loading import load_mixed_sft

    layout, f = RunLayout.at(run_dir), cfg.fusion
    for d in cfg.dimensions:
        if f.mix_weights.get(d, 0.0) > 0:
            check_inputs(layout, d)
    plan = plan_steps(cfg, layout.data)
    bcfg = _baseline_config(cfg, replace(cfg.expert.train, max_steps=plan.multitask))
    tasks = list(load_mixed_sft(layout.data, "train", f.mix_weights, f.train.seed)["task"])
    extra = {"baseline": MULTITASK, "init": str(layout.base), "step_plan": plan.as_dict(),
             "mix_weights": dict(f.mix_weights), "mix_seed": f.train.seed,
             "rows_by_dimension": dict(sorted(Counter(tasks).items())),
             "seen_by_dimension": rows_seen(tasks, bcfg.expert.train, dist_env().world_size,
                                            plan.multitask)}
    return checked_job(bcfg, layout, MULTITASK, baseline_dirs(run_dir, MULTITASK),
                       lambda: len(tasks), resume, overwrite, mix_weights=dict(f.mix_weights),
                       mix_seed=f.train.seed, kind=f"baseline_{MULTITASK}", manifest_extra=extra)


def prepare_extra_steps_job(cfg: PipelineConfig, run_dir: str | Path, dimension: str,
                            resume: bool = False, overwrite: bool = False) -> ExpertJob:
    from ..data.loading import load_sft
    from ..surgery.gguf import check_llama_dir
    from ..surgery.zero_to_hf import MANIFEST

    check_dimension(cfg, dimension)
    if cfg.fusion.trainable != EXPERTS_TRAINABLE:
        raise ConfigError(f"the extra-steps control needs fusion.trainable={EXPERTS_TRAINABLE!r} "
                          f"(got {cfg.fusion.trainable!r}): fusion gives frozen experts no extra "
                          f"steps, so the stage-1 experts are already the control")
    layout = RunLayout.at(run_dir)
    check_inputs(layout, dimension)
    expert = layout.expert(dimension)
    if not expert.is_dir():
        raise FileNotFoundError(f"stage-1 expert not found: {expert} (run `h3fusion train-expert "
                                f"--dimension {dimension}`)")
    check_llama_dir(expert)
    check_model_weights(expert, f"stage-1 expert {dimension}")
    plan = plan_steps(cfg, layout.data)
    bcfg = _baseline_config(cfg, replace(cfg.fusion.train, max_steps=plan.extra_steps))
    tasks = list(load_sft(layout.data, dimension, "train")["task"])
    stage1 = read_json(expert / MANIFEST).get("total_steps") if (expert / MANIFEST).is_file() else None
    extra = {"baseline": EXTRA_STEPS, "init": str(expert), "init_steps": stage1,
             "step_plan": plan.as_dict(),
             "seen_by_dimension": rows_seen(tasks, bcfg.expert.train, dist_env().world_size,
                                            plan.extra_steps)}
    return checked_job(bcfg, layout, dimension,
                       baseline_dirs(run_dir, f"{EXTRA_STEPS}/{dimension}"), lambda: len(tasks),
                       resume, overwrite, init=expert, kind=f"baseline_{EXTRA_STEPS}",
                       manifest_extra=extra)


def _check_launch(job: ExpertJob, cfg: PipelineConfig, run_dir: str | Path) -> None:
    """Warnings (rank 0) when the run cannot be the step-matched comparison it is meant to be."""
    if job.rank != 0:
        return
    stale = plan_mismatches(job.manifest_extra["step_plan"],
                            recorded_steps(cfg, RunLayout.at(run_dir)))
    if stale:
        log.warning("%s: the finished stages ran other step counts than this config gives (%s): "
                    "were they run with other settings or world sizes?", job.kind, "; ".join(stale))
    if job.kind == f"baseline_{EXTRA_STEPS}" and job.world_size != cfg.fusion.num_procs:
        log.warning("%s: %d ranks, but fusion runs on fusion.num_procs=%d: the global batch "
                    "differs from fusion's", job.kind, job.world_size, cfg.fusion.num_procs)


def train_baseline(cfg: PipelineConfig, run_dir: str | Path, kind: str,
                   dimension: Optional[str] = None, resume: bool = False,
                   overwrite: bool = False) -> int:
    """Returns 0 when done, or the requeue exit code after a stop signal (checkpoint saved)."""
    t0 = time.time()
    if kind == MULTITASK and dimension is None:
        job = prepare_multitask_job(cfg, run_dir, resume, overwrite)
    elif kind == EXTRA_STEPS and dimension is not None:
        job = prepare_extra_steps_job(cfg, run_dir, dimension, resume, overwrite)
    else:
        raise ValueError(f"baseline {kind!r} with dimension {dimension!r}: {MULTITASK!r} takes no "
                         f"dimension, {EXTRA_STEPS!r} needs one (kinds: {list(KINDS)})")
    _check_launch(job, cfg, run_dir)
    return run_job(job, t0)

"""`h3fusion train-baseline`: the training baselines of H3Fusion (docs/baselines.md).

Each is a stage-1 job (pipeline.train.expert.stage: DeepSpeed ZeRO-3, FFN weights only, method `ffn`)
with another data source, init weights and step count, so a difference to the fused model is the
fusion itself rather than more data or more optimizer steps:

- `multitask --variant V` (pipeline.registry.MULTITASK_VARIANTS): the base, trained with
  expert.train's settings on the multi-task union (`step_plan.union_sft`: every sft/<dim>/train
  row the experts trained on, then the fusion mix) -> <run>/baselines/multitask_<V>.
  `data_matched`: exactly one epoch over the union; `compute_matched`: sum over dimensions of
  stage 1 plus fusion optimizer steps (the epochs cycle).
- `extra_steps --dimension D`: stage 1's expert D, trained on its own sft/D/train for F more
  optimizer steps with fusion.train's settings (lr, schedule, batch) -> <run>/baselines/
  extra_steps/D. Only when fusion trains the experts (fusion.trainable router+experts).

Step counts come from `step_plan.plan_steps` (the trainers' own BatchSchedule rule).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ...config import ConfigError, PipelineConfig, TrainConfig, check_dimension
from ...io_utils import read_json
from ...layout import RunLayout
from ...model.trainable import sets_training_experts, trainable_set
from ...registry import MULTITASK_VARIANTS
from ..expert.stage import ExpertJob, check_inputs, checked_job, run_job
from ..inputs import check_model_weights, count_saved_rows
from ..step_plan import by_dimension, plan_steps, union_tasks, variant_train

MULTITASK, EXTRA_STEPS = "multitask", "extra_steps"
KINDS = (MULTITASK, EXTRA_STEPS)
log = logging.getLogger(__name__)


def baseline_dirs(run_dir: str | Path, name: str) -> tuple[Path, Path, Path]:
    """(HF output, DeepSpeed checkpoints, TensorBoard) of baseline `name`
    ("multitask_<variant>" or "extra_steps/<dim>")."""
    run = RunLayout.at(run_dir)
    return (run.baseline(name), run.baseline_ds(name),
            run.tensorboard / f"baseline_{name.replace('/', '_')}")


# ----------------------------------------------------------------------------- step checks

def recorded_steps(cfg: PipelineConfig, layout: RunLayout) -> dict[str, int]:
    """The step counts finished stages wrote in their manifests (to cross-check the plan)."""
    from ...io_utils import MANIFEST
    from ..fusion.stage import MANIFEST as FUSION_MANIFEST

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


# ----------------------------------------------------------------------------- jobs

def _baseline_config(cfg: PipelineConfig, train: TrainConfig) -> PipelineConfig:
    """The config the stage-1 trainer sees: FFN fine-tuning with `train` (step count set)."""
    return replace(cfg, expert=replace(cfg.expert, method="ffn", train=train))


def prepare_multitask_job(cfg: PipelineConfig, run_dir: str | Path, variant: str,
                          resume: bool = False, overwrite: bool = False) -> ExpertJob:
    """The base, FFN fine-tuned with expert.train's settings on the multi-task union, for the
    steps `variant` gives (pipeline.registry.MULTITASK_VARIANTS)."""
    MULTITASK_VARIANTS.check(variant, "train-baseline --variant")
    layout, f = RunLayout.at(run_dir), cfg.fusion
    for d in cfg.dimensions:   # the union holds every dimension's stage-1 rows
        check_inputs(layout, d)
    plan = plan_steps(cfg, layout.data)
    train = variant_train(variant, cfg.expert.train, plan, "train-baseline --variant")
    tasks = union_tasks(cfg, layout.data)
    name = f"{MULTITASK}_{variant}"
    extra = {"baseline": name, "variant": variant, "init": str(layout.base),
             "step_plan": plan.as_dict(), "mix_weights": dict(f.mix_weights),
             "mix_seed": f.train.seed, "union": list(cfg.dimensions),
             "rows_by_dimension": by_dimension(tasks)}
    return checked_job(_baseline_config(cfg, train), layout, MULTITASK, baseline_dirs(run_dir, name),
                       lambda: len(tasks), resume, overwrite, mix_weights=dict(f.mix_weights),
                       mix_seed=f.train.seed, union_dims=tuple(cfg.dimensions),
                       kind=f"baseline_{name}", manifest_extra=extra)


def prepare_extra_steps_job(cfg: PipelineConfig, run_dir: str | Path, dimension: str,
                            resume: bool = False, overwrite: bool = False) -> ExpertJob:
    from ...checkpoint.gguf import check_llama_dir
    from ...io_utils import MANIFEST

    check_dimension(cfg, dimension)
    if not trainable_set(cfg.fusion.trainable).trains_experts:
        raise ConfigError(f"fusion.trainable={cfg.fusion.trainable!r} does not train the experts; "
                          f"the extra-steps control needs one that does "
                          f"({' or '.join(sets_training_experts())}): fusion gives frozen experts "
                          f"no extra steps, so the stage-1 experts are already the control")
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
    rows = count_saved_rows(layout.data / "sft" / dimension / "train")
    stage1 = read_json(expert / MANIFEST).get("total_steps") if (expert / MANIFEST).is_file() else None
    extra = {"baseline": EXTRA_STEPS, "init": str(expert), "init_steps": stage1,
             "step_plan": plan.as_dict(), "rows_by_dimension": {dimension: rows}}
    return checked_job(bcfg, layout, dimension,
                       baseline_dirs(run_dir, f"{EXTRA_STEPS}/{dimension}"), lambda: rows,
                       resume, overwrite, init=expert, kind=f"baseline_{EXTRA_STEPS}",
                       manifest_extra=extra, precision_key="fusion.train.precision")


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
                   overwrite: bool = False, variant: Optional[str] = None) -> int:
    """Returns 0 when done, or the requeue exit code after a stop signal (checkpoint saved)."""
    t0 = time.time()
    if kind == MULTITASK and dimension is None and variant is not None:
        job = prepare_multitask_job(cfg, run_dir, variant, resume, overwrite)
    elif kind == EXTRA_STEPS and dimension is not None and variant is None:
        job = prepare_extra_steps_job(cfg, run_dir, dimension, resume, overwrite)
    else:
        raise ValueError(f"baseline {kind!r} with dimension {dimension!r}, variant {variant!r}: "
                         f"{MULTITASK!r} takes a variant and no dimension, {EXTRA_STEPS!r} a "
                         f"dimension and no variant (kinds: {list(KINDS)})")
    _check_launch(job, cfg, run_dir)
    return run_job(job, t0)

"""The stage graph: one definition, two launchers (`h3fusion run` locally, `slurm/pipeline.sh`).

Each stage is an `h3fusion` subcommand with its arguments, the number of processes it runs with
(distributed stages go under torchrun / srun+torchrun), the directory whose presence marks it done
(every stage writes its output atomically, so presence means complete), and the SLURM script that
runs it on a cluster.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import PipelineConfig
from .env import free_port
from .layout import RunLayout
from .registry import ENSEMBLES, MOE_BACKENDS, ROUTER_INITS, TRAINABLE_SETS



@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]        # h3fusion subcommand and its stage-specific arguments
    nprocs: int                  # > 1: launched under torchrun (or srun + torchrun)
    outputs: tuple[Path, ...]    # all exist => stage complete (outputs are written atomically)
    slurm_script: str            # slurm/<script> that runs it on a cluster
    after: tuple[str, ...] = ()
    takes_config: bool = True    # False: a surgery tool with explicit paths only


def _expert_stages(cfg: PipelineConfig, run: RunLayout) -> list[Stage]:
    return [Stage(f"expert_{t}", ("train-expert", "--dimension", t), cfg.expert.num_procs,
                  (run.expert(t),), "stage1_experts.sh", ("base",)) for t in cfg.dimensions]


def _build_moe_argv(cfg: PipelineConfig, run: RunLayout) -> tuple[str, ...]:
    experts = tuple(f"{t}={run.expert(t)}" for t in cfg.dimensions)
    argv = ("surgery", "build_moe", "--base", str(run.base), "--experts", *experts,
            "--out", str(run.fused_init), "--top-k", str(cfg.fusion.top_k),
            "--router-init", cfg.fusion.router_init, "--overwrite",
            # the router init's draws (`normal`) follow fusion's seed, so `--seed N` reseeds them
            "--seed", str(cfg.fusion.train.seed))
    if ROUTER_INITS.get(cfg.fusion.router_init, "fusion.router_init").needs_prompts:
        argv += ("--prompts-data", str(run.data))
    return argv


def baseline_stages(cfg: PipelineConfig, run: RunLayout) -> list[Stage]:
    """The enabled training baselines (docs/baselines.md): one stage per multi-task variant, on
    stage 1's process count (its settings are expert.train's); the extra-steps control runs on
    fusion's process count, so its global batch (and so each step) is fusion's."""
    out = []
    if cfg.baselines.multitask:
        out += [Stage(f"baseline_multitask_{v}", ("train-baseline", "--kind", "multitask",
                                                   "--variant", v),
                      cfg.expert.num_procs, (run.baseline(f"multitask_{v}"),), "stage2_fusion.sh",
                      ("base",)) for v in cfg.baselines.multitask_variants]
    if cfg.baselines.extra_steps and \
            TRAINABLE_SETS.get(cfg.fusion.trainable, "fusion.trainable").trains_experts:
        out += [Stage(f"baseline_extra_steps_{t}",
                      ("train-baseline", "--kind", "extra_steps", "--dimension", t),
                      cfg.fusion.num_procs, (run.baseline(f"extra_steps/{t}"),),
                      "stage2_fusion.sh", (f"expert_{t}",)) for t in cfg.dimensions]
    return out


def pipeline_stages(cfg: PipelineConfig, run: RunLayout) -> list[Stage]:
    """Stages in an order that respects `after` (a valid sequential schedule)."""
    experts = tuple(f"expert_{t}" for t in cfg.dimensions)
    baselines = baseline_stages(cfg, run)
    stages = [
        Stage("data", ("data",), 1, (run.data,), "stage0_prepare.sh"),
        # with base.gguf the tokenizer stage takes the GGUF's tokenizer (the one the base stage
        # saves beside the converted model), so the order stays the same (docs/smollm2.md)
        Stage("tokenizer", ("tokenizer",), 1, (run.tokenizer,), "stage0_prepare.sh", ("data",)),
        Stage("base", ("base",), 1, (run.base,), "stage0_prepare.sh", ("tokenizer",)),
        *_expert_stages(cfg, run),
        Stage("build_moe", _build_moe_argv(cfg, run), 1, (run.fused_init,), "stage2_fusion.sh",
              experts, takes_config=False),
        Stage("fuse", ("fuse",), cfg.fusion.num_procs, (run.fused,), "stage2_fusion.sh",
              ("build_moe",)),
        *baselines,
        Stage("merge", ("merge",), 1, tuple(run.merge(m) for m in cfg.merge.methods),
              "stage3_eval.sh", experts),
        # LLM-ensemble baselines: configs pointing at the experts (+ the router's classifier);
        # every registered method, read now (names only: listing the stages imports no model code)
        Stage("ensemble", ("ensemble",), 1, tuple(run.ensemble(m) for m in ENSEMBLES.names()),
              "stage3_eval.sh", experts),
        Stage("evaluate", ("evaluate",), 1, (run.eval / "report.json",), "stage3_eval.sh",
              ("fuse", "merge", "ensemble", *(b.name for b in baselines))),
        Stage("profile", ("profile",), 1, (run.profile,), "stage3_eval.sh", ("fuse",)),
    ]
    return stages


def format_stage_table(stages: list[Stage]) -> str:
    """Tab-separated `name nprocs slurm_script after` lines (read by slurm/pipeline.sh)."""
    return "\n".join(f"{s.name}\t{s.nprocs}\t{s.slurm_script}\t{','.join(s.after) or '-'}"
                     for s in stages)


def is_done(stage: Stage) -> bool:
    return all(p.exists() for p in stage.outputs)


def launcher_argv(nprocs: int, port: Optional[int] = None, python: str = sys.executable) -> list[str]:
    """The argv prefix that runs an `h3fusion` subcommand locally: `python -m pipeline.commands`,
    or for nprocs > 1 torchrun through `pipeline.commands.launch` (signals forwarded to the
    ranks, their exit 85 kept) on `port` (None: a free one now)."""
    if nprocs <= 1:
        return [python, "-m", "pipeline.commands"]
    return [python, "-m", "pipeline.commands.launch", "--standalone", f"--nproc-per-node={nprocs}",
            f"--master-port={free_port() if port is None else port}", "-m", "pipeline.commands"]


def stage_command(stage: Stage, config_path: Path, run_dir: Path,
                  python: str = sys.executable) -> list[str]:
    """The argv that runs `stage` locally, as `h3fusion run` starts it: the launcher, the stage's
    subcommand and, when it takes them, `--config config_path --run-dir run_dir`."""
    common = ["--config", str(config_path), "--run-dir", str(run_dir)] if stage.takes_config else []
    return launcher_argv(stage.nprocs, python=python) + list(stage.argv) + common


def cuda_needs(cfg: PipelineConfig, stage_names=None) -> list[str]:
    """The config settings that run only on CUDA GPUs, each naming its stage, for the stages in
    `stage_names` (None: all). Empty: everything can run on CPU."""
    backend = cfg.fusion.moe_backend
    cuda_only = MOE_BACKENDS.get(backend, "fusion.moe_backend").needs_cuda
    needs = {"fuse": [f"fusion.moe_backend={backend} (stage fuse; use fusion.moe_backend=torch "
                      "on CPU)"] if cuda_only else []}
    return [need for stage, settings in needs.items()
            if stage_names is None or stage in stage_names for need in settings]


def require_cuda_for(cfg: PipelineConfig, stage_names=None) -> None:
    """One CudaUnavailableError before any work when a stage about to run needs CUDA that torch
    cannot use here (a GPU preset on a machine without CUDA)."""
    from .env import require_cuda

    needs = cuda_needs(cfg, stage_names)
    if needs:
        require_cuda(f"{cfg.name}: {', '.join(needs)}")

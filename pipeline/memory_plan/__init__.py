"""Will a config fit a cluster? Per-GPU and per-node host memory of every training stage
(`h3fusion plan`, docs/performance.md "Memory plan").

Pure arithmetic over sizes counted from the real model config on the meta device (no weights):
`sizes` (the base config and each stage's model by role), `states` (ZeRO model states, host
memory per phase), `activations` (what autograd keeps per micro step). This package never
imports DeepSpeed; the DeepSpeed JSON is read as plain JSON.

    runs = stage_runs(cfg, spec)                    # expert, fusion, baselines
    report = plan(cfg, settings, gpu_mem_gb, host_mem_gb)
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..config import PipelineConfig
from ..registry import TRAINABLE_SETS
from .sizes import BaseSpec, base_spec, dense_stage, fusion_stage
from .states import (BF16, DEFAULT_LOAD_PATH, FP16, FP32, GIB, LOAD_PATHS, LoadPath, PlanSettings, Precision,
                     StageRun, ZeroSettings, candidate_shapes, check_fit, model_state_bytes,
                     stage_plan)

__all__ = ["BF16", "DEFAULT_LOAD_PATH", "FP16", "FP32", "GIB", "LOAD_PATHS", "BaseSpec", "LoadPath", "PlanSettings",
           "Precision", "StageRun", "ZeroSettings", "base_spec", "check_fit", "model_shape",
           "model_state_bytes", "plan", "smallest_fit", "stage_plan", "stage_runs"]

MAX_NODES = 64


def zero_settings(path: str) -> ZeroSettings:
    from ..backends.deepspeed_engine import load_ds_config   # plain JSON (no deepspeed import)
    return ZeroSettings.from_ds_config(load_ds_config(path, require_stage=None), str(path))


def _ckpt(train, override: Optional[bool]) -> bool:
    return bool(getattr(train, "gradient_checkpointing", False)) if override is None else override


def model_shape(cfg: PipelineConfig, spec: BaseSpec) -> dict:
    """The sizes the activation formula reads (LlamaConfig defaults fill what config.json omits)."""
    from transformers import LlamaConfig
    c = LlamaConfig.from_dict(dict(spec.fields, model_type="llama"))
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings")
    return {**{k: int(getattr(c, k)) for k in keys}, "num_experts": len(cfg.dimensions),
            "top_k": cfg.fusion.top_k}


def stage_runs(cfg: PipelineConfig, spec: BaseSpec,
               gradient_checkpointing: Optional[bool] = None) -> list[StageRun]:
    """Stage 1 (one expert), stage 2 (fusion) and the training baselines, as the config runs
    them; a baseline the config turns off is planned but marked `enabled=False`."""
    e, f, b = cfg.expert, cfg.fusion, cfg.baselines
    ez, fz = zero_settings(e.ds_config), zero_settings(f.ds_config)
    expert = dense_stage("expert", spec.fields, e.method, e.lora)
    ffn = expert if e.method == "ffn" else dense_stage("expert", spec.fields, "ffn")
    extra = b.extra_steps and TRAINABLE_SETS.get(f.trainable, "fusion.trainable").trains_experts
    return [
        StageRun(expert, ez, e.train.micro_batch_size, e.train.max_seq_len,
                 gradient_checkpointing=_ckpt(e.train, gradient_checkpointing)),
        StageRun(fusion_stage(cfg, spec.fields, fz.stage), fz, f.train.micro_batch_size,
                 f.train.max_seq_len, f.ep_degree, gradient_checkpointing=_ckpt(f.train, gradient_checkpointing)),
        # every multi-task variant (baselines.multitask_variants): the same model, batch and
        # ZeRO settings, only the step count differs, so one row plans them all
        StageRun(replace(ffn, stage="baseline multitask"), ez, e.train.micro_batch_size,
                 e.train.max_seq_len, enabled=b.multitask,
                 gradient_checkpointing=_ckpt(e.train, gradient_checkpointing)),
        StageRun(replace(ffn, stage="baseline extra_steps"), ez, f.train.micro_batch_size,
                 f.train.max_seq_len, enabled=extra,
                 gradient_checkpointing=_ckpt(f.train, gradient_checkpointing)),
    ]


def _feasible(run: StageRun, settings: PlanSettings) -> bool:
    return settings.world % run.ep_degree == 0


def shape_plans(runs: list[StageRun], shape: dict, settings: PlanSettings, gpu_mem_gb: float,
                host_mem_gb: float) -> list[dict]:
    """Every stage's plan at `settings`' shape, with its fit."""
    out = []
    for run in runs:
        p = stage_plan(run, shape, settings)
        p["fit"] = check_fit(p, gpu_mem_gb, host_mem_gb)
        if not _feasible(run, settings):
            p["fit"].update(fits=False, reason=f"fusion.ep_degree={run.ep_degree} does not divide "
                                                f"the world size {settings.world}")
        out.append(p)
    return out


def smallest_fit(runs: list[StageRun], shape: dict, settings: PlanSettings, gpu_mem_gb: float,
                 host_mem_gb: float, max_nodes: int = MAX_NODES) -> dict:
    """Per stage and for all enabled stages together: the smallest (nodes, gpus per node) with
    `settings`' GPUs per node at most that fits (None: nothing up to `max_nodes` nodes)."""
    found: dict = {run.model.stage: None for run in runs}
    found["all"] = None
    for nodes, gpus in candidate_shapes(settings.gpus_per_node, max_nodes):
        s = replace(settings, nodes=nodes, gpus_per_node=gpus)
        fits = [p["fit"]["fits"] for p in shape_plans(runs, shape, s, gpu_mem_gb, host_mem_gb)]
        for run, ok in zip(runs, fits):
            if ok and found[run.model.stage] is None:
                found[run.model.stage] = [nodes, gpus]
        if found["all"] is None and all(ok for run, ok in zip(runs, fits) if run.enabled):
            found["all"] = [nodes, gpus]
        if all(v is not None for v in found.values()):
            break
    return found


def plan(cfg: PipelineConfig, settings: PlanSettings, gpu_mem_gb: float, host_mem_gb: float,
         spec: Optional[BaseSpec] = None, gradient_checkpointing: Optional[bool] = None,
         max_nodes: int = MAX_NODES) -> dict:
    """The whole report: base model, settings, every stage at the shape, the smallest fits."""
    spec = spec or base_spec(cfg)
    shape = model_shape(cfg, spec)
    runs = stage_runs(cfg, spec, gradient_checkpointing)
    stages = shape_plans(runs, shape, settings, gpu_mem_gb, host_mem_gb)
    short = [p for p in stages if p["enabled"] and not p["fit"]["fits"]]
    return {"config": cfg.name, "base": {"origin": spec.origin, **shape},
            "shape": {"nodes": settings.nodes, "gpus_per_node": settings.gpus_per_node,
                      "gpu_mem_gb": gpu_mem_gb, "host_mem_gb": host_mem_gb},
            "assumptions": {"precision": settings.precision.name, "load_path": settings.load_path.name,
                            "load_path_means": settings.load_path.what,
                            "host_runtime_gb_per_rank": settings.host_runtime_gb,
                            "gpu_reserve_gb": settings.gpu_reserve_gb, "gb": "2^30 bytes"},
            "stages": stages, "fits": not short,
            "smallest_fit": smallest_fit(runs, shape, settings, gpu_mem_gb, host_mem_gb, max_nodes)}

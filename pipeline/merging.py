"""Merging baselines of the paper: weight average, task arithmetic and TIES.

Pure tensor functions (`average`, `task_arithmetic`, `ties`) work on one parameter at a time in
fp32 and return the input dtype; `merge_checkpoints` streams them over whole HF Llama dirs one
tensor at a time; `h3fusion merge` merges a run's three experts into `<run>/merges/<method>`.

- average:          mean_i θ_i
- task_arithmetic:  θ_base + λ Σ_i (θ_i − θ_base)
- ties (Yadav et al. 2023): τ_i = θ_i − θ_base, keep the top `density` fraction of |τ_i|
  (per tensor), elect a sign per entry as sgn(Σ_i τ̂_i) (the sign with more total magnitude),
  average only the kept entries that agree with it (disjoint mean), θ_base + λ · mean.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .io_utils import atomic_dir, is_complete, sha256_dir, write_json
from .registry import MERGE_METHODS
from .surgery import plan
from .surgery.safetensors_io import (DEFAULT_SHARD_BYTES, CheckpointReader, ShardedWriter,
                                     copy_optional_files, copy_tokenizer_files, read_config_json)

log = logging.getLogger(__name__)
METHODS = MERGE_METHODS.names()   # registered in pipeline.registry.MERGE_METHODS
MANIFEST = "merge_manifest.json"


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    # anchored at the first model so that entries equal in every model come back bit-exact
    # (a plain fp32 mean of three equal values can be off by one ulp)
    anchor = tensors[0].float()
    deltas = torch.stack([t.float() - anchor for t in tensors])
    return (anchor + deltas.mean(dim=0)).to(tensors[0].dtype)


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], scale: float) -> torch.Tensor:
    base32 = base.float()
    task_sum = torch.stack([t.float() - base32 for t in tensors]).sum(dim=0)
    return (base32 + scale * task_sum).to(base.dtype)


def trim_to_density(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density * n) largest-magnitude entries (ties keep the first found)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    flat = task_vector.reshape(-1)
    keep = math.ceil(density * flat.numel())
    if keep >= flat.numel():
        return task_vector.clone()
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(task_vector.shape)


def ties(base: torch.Tensor, tensors: list[torch.Tensor], density: float,
         scale: float = 1.0) -> torch.Tensor:
    base32 = base.float()
    trimmed = torch.stack([trim_to_density(t.float() - base32, density) for t in tensors])
    elected_sign = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected_sign) & (trimmed != 0)
    kept_sum = (trimmed * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp_min(1)
    return (base32 + scale * kept_sum / count).to(base.dtype)


# the registered forms: one signature (base, tensors, scale, density) for every method
def merge_average(base, tensors, scale: float, density: float) -> torch.Tensor:
    return average(tensors)


def merge_task_arithmetic(base, tensors, scale: float, density: float) -> torch.Tensor:
    return task_arithmetic(base, tensors, scale)


def merge_ties(base, tensors, scale: float, density: float) -> torch.Tensor:
    return ties(base, tensors, density, scale)


def merge_tensor(method: str, base: torch.Tensor, tensors: list[torch.Tensor], scale: float,
                 density: float) -> torch.Tensor:
    merge = MERGE_METHODS.get(method, "merge method")
    if not tensors[0].is_floating_point():
        return base.clone()    # integer buffers are not merged
    return merge(base, tensors, scale, density)


def _open_all(base_dir: Path, models: dict[str, Path],
              tokenizer_dir: Path) -> tuple[dict, CheckpointReader, dict]:
    """Validate architecture, tokenizer and tensor names/shapes of every input."""
    from .surgery.tokenizer_check import check_same_tokenizer, has_tokenizer
    base_cfg = read_config_json(base_dir)
    cfgs = {f"model {n!r} ({d})": read_config_json(d) for n, d in models.items()}
    plan.check_same_architecture(base_cfg, cfgs, base_dir)
    base = CheckpointReader(base_dir)
    readers = {n: CheckpointReader(d) for n, d in models.items()}
    for name, reader in readers.items():
        plan.check_same_keys(base.shapes(), reader.shapes(), str(base_dir), f"model {name!r}")
        for key in base.keys():
            if reader.dtype_name(key) != base.dtype_name(key):
                raise ValueError(f"model {name!r}: tensor {key} is {reader.dtype_name(key)}, "
                                 f"base has {base.dtype_name(key)}")
    if not has_tokenizer(tokenizer_dir):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files to copy into the merge "
                                f"(pass --tokenizer DIR)")
    check_same_tokenizer(tokenizer_dir, [d for d in models.values() if has_tokenizer(d)],
                         int(base_cfg["vocab_size"]))
    return base_cfg, base, readers


def merge_checkpoints(method: str, base_dir: str | Path, models: dict[str, Path],
                      out: str | Path, scale: float = 0.5, density: float = 0.5,
                      overwrite: bool = False, tokenizer: str | Path | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Merge dense Llama dirs tensor by tensor into `out` (config/tokenizer from the base)."""
    from transformers import LlamaConfig
    base_dir, out = Path(base_dir), Path(out)
    models = {n: Path(d) for n, d in models.items()}
    MERGE_METHODS.check(method, "merge method")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    tokenizer_dir = Path(tokenizer) if tokenizer else base_dir
    base_cfg, base, readers = _open_all(base_dir, models, tokenizer_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for key in base.keys():
            tensors = [r.get(key) for r in readers.values()]
            writer.add(key, merge_tensor(method, base.get(key), tensors, scale, density))
        writer.close()
        LlamaConfig.from_pretrained(base_dir).save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        copy_optional_files(base_dir, tmp, ["generation_config.json"])
        write_json(tmp / MANIFEST, {
            "tool": "merge", "method": method, "scale": scale, "density": density,
            "base": {"path": str(base_dir.resolve()), "sha256": sha256_dir(base_dir)},
            "models": [{"name": n, "path": str(d.resolve()), "sha256": sha256_dir(d)}
                       for n, d in models.items()]})
    log.info("merge: wrote %s (%s of %s)", out, method, list(models))
    return out


# ----------------------------------------------------------------------------- h3fusion merge

def merge_run_experts(cfg, run_dir: str | Path, methods: list[str] | None = None,
                      overwrite: bool = False, log=print) -> None:
    """Merge the run's experts (config `dimensions` order) onto its base, one output dir per
    method (`methods`, default the config's `merge.methods`); `cfg` is the whole PipelineConfig."""
    from .layout import RunLayout
    from .surgery.tokenizer_check import has_tokenizer
    layout = RunLayout.at(run_dir)
    experts = {dim: layout.expert(dim) for dim in cfg.dimensions}
    tokenizer = layout.base if has_tokenizer(layout.base) else layout.tokenizer
    for method in methods or cfg.merge.methods:
        if is_complete(layout.merge(method), MANIFEST) and not overwrite:
            # outputs are atomic, so a dir with its manifest is a finished merge: resume past it
            log(f"h3fusion merge: {method}: {layout.merge(method)} is complete, skipping "
                f"(--overwrite to redo)")
            continue
        scale = {"task_arithmetic": cfg.merge.task_arithmetic_scale,
                 "ties": cfg.merge.ties_scale}.get(method, 1.0)
        merge_checkpoints(method, layout.base, experts, layout.merge(method), scale=scale,
                          density=cfg.merge.ties_density, overwrite=overwrite,
                          tokenizer=tokenizer)
        log(f"h3fusion merge: {method} -> {layout.merge(method)}")

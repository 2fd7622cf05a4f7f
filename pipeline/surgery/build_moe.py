"""build_moe: dense aligned Llama experts -> one H3Fusion sparse MoE checkpoint.

Embeddings, attention, norms and LM head come from the base; layer l's expert i is aligned model
i's MLP of layer l, stacked into the MegaBlocks GLU layout of docs/contracts.md
(`mlp.experts.w1/v1/w2 [E*F, H]`, w2 = down_proj.weight.T) behind a new router `[E, H]`.
Everything is validated before the first byte is written; tensors stream one layer at a time.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config_ranges import top_k_problem
from ..io_utils import atomic_dir, sha256_dir, write_json
from . import plan
from .router_init import ROUTER_INITS, load_router_prompts, make_router_weights
from ..checkpoint.safetensors_io import (DEFAULT_SHARD_BYTES, CheckpointReader, ShardedWriter,
                             copy_optional_files, copy_tokenizer_files, read_config_json)
from ..checkpoint.tokenizer_check import check_same_tokenizer, has_tokenizer

log = logging.getLogger(__name__)
MANIFEST = "fusion_manifest.json"


@dataclass
class BuildInputs:
    """Validated inputs: configs, readers and the facts the writer needs."""
    base_dir: Path
    base_cfg: dict
    spec: plan.ModelSpec
    base: CheckpointReader
    experts: dict[str, CheckpointReader]
    tokenizer_dir: Path
    shared_deviation: dict[str, float]


def _check_expert_dtypes(experts: dict[str, CheckpointReader]) -> None:
    """Stacking needs one dtype; refuse rather than silently cast an expert."""
    key = plan.dense_mlp_key(0, "gate_proj")
    dtypes = {name: r.dtype_name(key) for name, r in experts.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"experts store their MLP weights in different dtypes {dtypes}; "
                         f"convert them to one dtype first")


def max_shared_deviation(base: CheckpointReader, expert: CheckpointReader) -> float:
    """Largest |expert - base| over every non-MLP tensor (attention, norms, embeddings)."""
    worst = 0.0
    for key in base.keys():
        if plan.is_dense_mlp_key(key):
            continue
        diff = (expert.get_finite(key).float() - base.get_finite(key).float()).abs().max().item()
        worst = max(worst, diff)
    return worst


def validate_inputs(base_dir: str | Path, expert_dirs: dict[str, Path],
                    tokenizer_dir: str | Path | None = None) -> BuildInputs:
    base_dir = Path(base_dir)
    base_cfg = read_config_json(base_dir)
    expert_cfgs = {f"expert {n!r} ({d})": read_config_json(d) for n, d in expert_dirs.items()}
    plan.check_same_architecture(base_cfg, expert_cfgs, base_dir)
    spec = plan.ModelSpec.from_config(base_cfg, base_dir)
    base = CheckpointReader(base_dir)
    base_shapes = base.shapes()
    plan.check_dense_mlp_keys(base_shapes, spec, str(base_dir))
    experts = {name: CheckpointReader(d) for name, d in expert_dirs.items()}
    for name, reader in experts.items():
        plan.check_same_keys(base_shapes, reader.shapes(), str(base_dir), f"expert {name!r}")
    _check_expert_dtypes(experts)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else base_dir
    if not has_tokenizer(tok_dir):
        raise FileNotFoundError(f"{tok_dir}: no tokenizer files; pass --tokenizer DIR")
    others = [base_dir, *expert_dirs.values()]
    check_same_tokenizer(tok_dir, [d for d in others if has_tokenizer(d)], spec.vocab_size)
    deviation = {name: max_shared_deviation(base, r) for name, r in experts.items()}
    for name, dev in deviation.items():
        if dev > 0:
            warnings.warn(f"expert {name!r}: attention/embedding/norm weights differ from the base "
                          f"by up to {dev:.3g}; the fused model uses the base's (H3Fusion assumes "
                          f"frozen attention)", stacklevel=2)
    return BuildInputs(base_dir, base_cfg, spec, base, experts, tok_dir, deviation)


def stacked_expert_layer(experts: list[CheckpointReader], layer: int) -> dict[str, torch.Tensor]:
    """One layer's w1/v1/w2 [E*F, H]; expert e owns rows e*F:(e+1)*F."""
    def stack(proj: str, transpose: bool) -> torch.Tensor:
        parts = [r.get_finite(plan.dense_mlp_key(layer, proj)) for r in experts]
        return torch.cat([p.t() if transpose else p for p in parts], dim=0).contiguous()
    return {"w1": stack("gate_proj", False), "v1": stack("up_proj", False),
            "w2": stack("down_proj", True)}


def fusion_config(base_cfg: dict, names: list[str], top_k: int):
    from ..model import H3FusionConfig   # registers the model type with AutoConfig
    # `top_k` in a dense config.json is a sampling setting (older transformers saved one); an
    # H3Fusion config would read it as the legacy name of its routing top-k
    fields = {k: v for k, v in base_cfg.items()
              if k not in ("model_type", "architectures", "top_k")}
    cfg = H3FusionConfig.from_dict({**fields, "num_experts": len(names),
                                    "num_experts_per_tok": top_k, "expert_names": list(names),
                                    "moe_backend": "torch"})
    cfg.architectures = ["H3FusionForCausalLM"]
    return cfg


def write_generation_config(base_dir: Path, out: Path) -> None:
    """The base's generation config: sampling defaults belong to the base model, never to
    anything derived from the MoE config."""
    from transformers import GenerationConfig, LlamaConfig
    if (base_dir / "generation_config.json").is_file():
        copy_optional_files(base_dir, out, ["generation_config.json"])
    else:
        base_cfg = LlamaConfig.from_pretrained(base_dir)
        GenerationConfig.from_model_config(base_cfg).save_pretrained(out)


def write_moe_weights(out: Path, inputs: BuildInputs, routers: list[torch.Tensor],
                      max_shard_bytes: int) -> None:
    writer = ShardedWriter(out, max_shard_bytes)
    experts = list(inputs.experts.values())
    dtype = experts[0].get(plan.dense_mlp_key(0, "gate_proj")).dtype
    for key in inputs.base.keys():
        if not plan.is_dense_mlp_key(key):
            writer.add(key, inputs.base.get_finite(key))
    for layer in range(inputs.spec.num_hidden_layers):
        writer.add(plan.router_key(layer), routers[layer].to(dtype))
        for param, tensor in stacked_expert_layer(experts, layer).items():
            writer.add(plan.moe_expert_key(layer, param), tensor)
    writer.close()


def _manifest(inputs: BuildInputs, expert_dirs: dict[str, Path], cfg, router_init: str,
              prompts_source: str | None, seed: int) -> dict:
    return {
        "tool": "build_moe",
        "base": {"path": str(inputs.base_dir.resolve()), "sha256": sha256_dir(inputs.base_dir)},
        "experts": [{"name": n, "path": str(d.resolve()), "sha256": sha256_dir(d)}
                    for n, d in expert_dirs.items()],
        "expert_names": list(expert_dirs),
        "tokenizer": str(inputs.tokenizer_dir.resolve()),
        "top_k": cfg.num_experts_per_tok,
        "router_init": router_init,
        "router_prompts": prompts_source,
        "router_init_seed": seed,   # read by the `normal` init only (zeros/prompts draw nothing)
        "shared_weight_max_deviation": inputs.shared_deviation,
        "config": cfg.to_dict(),
    }


@contextlib.contextmanager
def _removing_new_parents(out: Path):
    """On an error inside (e.g. a NaN found while the tensors stream), also remove the parent
    dirs of `out` that did not exist before (`atomic_dir` creates them), deepest first, while
    they are empty: a refused build leaves nothing behind."""
    new = [p for p in out.absolute().parents if not p.exists()]
    try:
        yield
    except BaseException:
        for parent in new:
            try:
                parent.rmdir()
            except OSError:   # not empty (someone else's files) or already gone
                break
        raise


def build_moe(base: str | Path, experts: dict[str, Path], out: str | Path, top_k: int = 2,
              router_init: str = "zeros", prompts_source: str | None = None,
              prompts_per_expert: int = 8, tokenizer: str | Path | None = None,
              overwrite: bool = False, seed: int = 0,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Validate everything, then write the fused checkpoint atomically; return `out`."""
    out, experts = Path(out), {n: Path(d) for n, d in experts.items()}
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    init = ROUTER_INITS.get(router_init, "--router-init")
    problem = top_k_problem(top_k, len(experts), " given by --experts")
    if problem:
        raise ValueError(f"--top-k {problem}")
    inputs = validate_inputs(base, experts, tokenizer)
    cfg = fusion_config(inputs.base_cfg, list(experts), top_k)
    prompts = None
    if init.needs_prompts:
        if not prompts_source:
            raise ValueError(f"--router-init {router_init} needs --prompts-data DIR or "
                             f"--prompts FILE")
        prompts = load_router_prompts(prompts_source, list(experts), prompts_per_expert)
    routers = make_router_weights(router_init, inputs.base_dir, inputs.tokenizer_dir,
                                  inputs.base_cfg, len(experts), seed, prompts)
    with _removing_new_parents(out), atomic_dir(out, overwrite=overwrite) as tmp:
        write_moe_weights(tmp, inputs, routers, max_shard_bytes)
        cfg.save_pretrained(tmp)
        copy_tokenizer_files(inputs.tokenizer_dir, tmp)
        write_generation_config(inputs.base_dir, tmp)
        write_json(tmp / MANIFEST, _manifest(inputs, experts, cfg, router_init, prompts_source, seed))
    log.info("build_moe: wrote %s (%d experts, top_k=%d)", out, len(experts), top_k)
    return out

"""Stage 2, `h3fusion fuse`: train the fused H3Fusion MoE on the mixed HHH data.

    L = L_CE + lambda * L_gate + sum_i gamma_i * L_drift,i  (+ load-balance, + router z-loss)

The model comes from `<run>/fused_init` (`h3fusion surgery build_moe`); `fusion.trainable` picks
router | router+lora | router+experts, everything else is frozen. One DeepSpeed engine (ZeRO-2
from `ds_configs/zero2_fusion_ep.json`, or ZeRO-3 without expert parallelism) trains all
trainable params. Expert parallelism keeps the full expert stack on every rank and computes only
the owned experts (pipeline.model.expert_parallel), so a rank's gradient for a foreign expert is
zero and the owner's gradient already holds every rank's tokens: DeepSpeed's ordinary mean over
the data-parallel world is then exactly the gradient of the global mean loss for any EP degree,
uneven splits included (each expert has exactly one owner per EP group, whether that rank owns 1
or 2 of E=3). No parameter is a DeepSpeed MoE parameter, so nothing is averaged over an
expert-data-parallel group only (tests/dist/test_fuse_train.py: E=3, top-2, EP=2 == EP=1).
Design notes: docs/stage2.md.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ...config import ConfigError, FusionConfig, PipelineConfig, dump_yaml
from ...env import dist_env, requeue_requested_exit_code
from ...io_utils import atomic_dir, check_output_dir, read_json, sha256_dir, write_json
from ...layout import RunLayout
from ...model.trainable import trainable_set
from ...registry import MOE_BACKENDS
from .data import MicroBatches, has_tokenizer, load_fusion_rows
from .loop import FusionLoop, NonFiniteLossError

log = logging.getLogger("h3fusion.fuse")
MANIFEST = "fusion_train_manifest.json"
HF_SNAPSHOT = "hf_latest"          # periodic consolidated model inside <run>/fused_ds
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class FusionPaths:
    init: Path          # H3Fusion MoE to start from (build_moe output)
    out: Path           # consolidated HF model written at the end
    ds_dir: Path        # DeepSpeed checkpoints (resume)
    tensorboard: Path

    @classmethod
    def for_run(cls, run: RunLayout, init: Optional[str] = None, out: Optional[str] = None):
        return cls(init=Path(init) if init else run.fused_init, out=Path(out) if out else run.fused,
                   ds_dir=run.fused_ds, tensorboard=run.tensorboard / "fusion")


# ----------------------------------------------------------------------------- input checks

def read_fused_config(init_dir: Path) -> dict:
    """The init dir's config.json, which must describe an H3Fusion MoE."""
    hint = ("build one with `h3fusion surgery build_moe --base <run>/base --experts "
            "<dimension>=<expert dir> ... --out <run>/fused_init` (or pass --init DIR)")
    cfg_file = init_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{init_dir}: no H3Fusion MoE here (missing config.json); {hint}")
    model_cfg = read_json(cfg_file)
    if model_cfg.get("model_type") != "h3fusion":
        raise ValueError(f"{init_dir} holds a {model_cfg.get('model_type')!r} model, not an "
                         f"H3Fusion MoE (model_type 'h3fusion'); {hint}")
    return model_cfg


def check_fusion_settings(fcfg: FusionConfig, model_cfg: dict, world_size: int,
                          zero_stage: int) -> None:
    """Config vs model vs launch checks, all before any process group or engine exists."""
    from ...surgery.plan import expert_names, experts_per_token
    names = expert_names(model_cfg, "fused model config")
    num_experts = len(names)
    # a zero gamma for a dimension the model lacks changes nothing; a real weight is an error
    unknown = [n for n, g in fcfg.gamma.items() if n not in names and g != 0]
    if unknown:
        raise ConfigError(f"fusion.gamma gives a weight to experts {unknown} that the fused model "
                          f"does not have (its experts: {names})")
    built_k = experts_per_token(model_cfg, "fused model config")
    if fcfg.top_k != built_k:
        # the fused model's config is the routing top-k's one source (build_moe wrote it from
        # fusion.top_k); training with another k would silently differ from what was built
        raise ConfigError(f"fusion.top_k={fcfg.top_k}, but the fused model was built with "
                          f"num_experts_per_tok={built_k}: rebuild it (build_moe --top-k "
                          f"{fcfg.top_k}, or delete fused_init/ and rerun h3fusion run)")
    ep = fcfg.ep_degree
    # uneven splits are fine on the torch backend (E=3 on 2 ranks owns 2 + 1 experts, see
    # model/expert_parallel.py); MegaBlocks' all-to-all needs equal shares
    if ep > num_experts:
        raise ConfigError(f"fusion.ep_degree={ep} exceeds the number of experts {num_experts}: "
                          f"a rank would own none")
    backend = MOE_BACKENDS.get(fcfg.moe_backend, "fusion.moe_backend")
    if num_experts % ep and backend.even_expert_split:
        raise ConfigError(f"fusion.ep_degree={ep} does not divide the number of experts "
                          f"{num_experts}, which fusion.moe_backend={fcfg.moe_backend} needs "
                          f"(the torch backend splits unevenly)")
    if world_size % ep:
        raise ConfigError(f"fusion.ep_degree={ep} does not divide the world size {world_size}")
    if zero_stage not in (2, 3):
        raise ConfigError(f"{fcfg.ds_config}: fusion needs ZeRO stage 2 or 3, got {zero_stage}")
    if zero_stage == 3 and ep > 1:
        raise ConfigError(f"{fcfg.ds_config}: ZeRO-3 partitions the experts, so expert parallelism "
                          f"needs ZeRO-2 (ds_configs/zero2_fusion_ep.json); got ep_degree={ep}")
    if zero_stage == 3 and trainable_set(fcfg.trainable).trains_experts and \
            any(g > 0 for g in fcfg.gamma.values()):
        raise ConfigError("the drift penalty (fusion.gamma > 0) reads whole expert weights outside "
                          "the forward pass, which ZeRO-3 partitions: use ZeRO-2")


def check_label_width(label_width: int, model_cfg: dict, source: str) -> None:
    if label_width != int(model_cfg["num_experts"]):
        raise ValueError(f"{source}: task_label has width {label_width} but the fused model has "
                         f"{model_cfg['num_experts']} experts {model_cfg.get('expert_names')}; "
                         f"labels must have one weight per expert, in expert order")


# ----------------------------------------------------------------------------- outputs

def save_consolidated(loop: "FusionLoop", out: Path, cfg: PipelineConfig, summary: dict) -> None:
    """All ranks call; rank 0 writes an HF model dir atomically (LoRA merged into the weights)."""
    model = loop.consolidated_model()
    if model is None:
        return
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (loop.paths.init / name).is_file():
                shutil.copy2(loop.paths.init / name, tmp / name)
        (tmp / "resolved_config.yaml").write_text(dump_yaml(cfg))
        write_json(tmp / MANIFEST, {**summary, "seed": cfg.fusion.train.seed,
                                    "init": str(loop.paths.init), "files": sha256_dir(tmp)})


def _prepare_out(paths: FusionPaths, overwrite: bool, resume: bool, env) -> None:
    """Outputs writable and the checkpoint to resume from intact, before any training step."""
    from ...backends.ds_checkpoint_check import resume_tag
    from ..inputs import check_model_weights, check_writable
    check_model_weights(paths.init, "fusion --init")
    check_output_dir(paths.out, overwrite)
    for path, what in ((paths.out, "fusion output"), (paths.ds_dir, "checkpoint dir"),
                       (paths.tensorboard, "TensorBoard dir")):
        check_writable(path, what)
    # a damaged newest checkpoint falls back (logged once); another world size is an error
    if resume_tag(paths.ds_dir, env.world_size, announce=env.rank == 0) is None and resume:
        raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {paths.ds_dir} (no 'latest')")


def _run_rows(cfg: PipelineConfig, paths: FusionPaths) -> tuple[list[dict], list[str]]:
    """`<run>/data`'s fusion mix, tokenized, and each row's source dimension (`task`)."""
    from ..step_plan import mix_tasks
    run = RunLayout.at(paths.ds_dir.parent)
    tokenizer_dir = paths.init if has_tokenizer(paths.init) else run.tokenizer
    return load_fusion_rows(cfg, tokenizer_dir, run.data), mix_tasks(cfg, run.data)


def train_fusion(cfg: PipelineConfig, paths: FusionPaths, *, resume: bool = False,
                 overwrite: bool = False, rows=None,
                 on_step_end: Optional[Callable[[int, "FusionLoop"], None]] = None) -> int:
    """Run fusion training; returns 0, or the requeue exit code after a stop signal.

    `rows`: already tokenized rows (input_ids, attention_mask, labels, task_label) instead of
    `<run>/data` (tests, custom data). `on_step_end(step, loop)` runs after every optimizer step.
    """
    from ...stages import require_cuda_for
    require_cuda_for(cfg, ["fuse"])   # megablocks on a machine without CUDA: before any work
    from ...backends import require_moe_backend   # megablocks: its compiled ops import
    require_moe_backend(cfg.fusion.moe_backend, "fusion.moe_backend")
    from ...env import accelerator_kind
    from ..mixed_precision import TrainPrecision
    # bf16 on a CPU without bf16 instructions: one error before any model or data loads
    precision = TrainPrecision.resolve("fusion.train.precision", cfg.fusion.train.precision,
                                       accelerator_kind())
    env = dist_env()
    model_cfg = read_fused_config(paths.init)
    from ...backends.deepspeed_engine import load_ds_config
    raw_ds = load_ds_config(cfg.fusion.ds_config, require_stage=None)  # repo-relative too
    check_fusion_settings(cfg.fusion, model_cfg, env.world_size,
                          int(raw_ds.get("zero_optimization", {}).get("stage", 0)))
    _prepare_out(paths, overwrite, resume, env)
    tasks = None   # each row's source dimension (for `seen_by_dimension`), when read from the run
    if rows is None:
        rows, tasks = _run_rows(cfg, paths)
    if not rows:
        raise ValueError(f"fusion training data ({paths.ds_dir.parent / 'data'}/sft/*/train, "
                         f"mixed by fusion.mix_weights): 0 rows")
    check_label_width(len(rows[0]["task_label"]), model_cfg, "training data")
    batches = MicroBatches(rows, cfg.fusion.train, env.rank, env.world_size, paths.init)
    loop = FusionLoop(cfg, paths, raw_ds, batches, precision)
    loop.on_periodic_save = lambda lp: save_consolidated(lp, paths.ds_dir / HF_SNAPSHOT, cfg,
                                                         lp.summary())
    loop.setup(resume_if_present=True)
    try:
        status = loop.run(on_step_end)
    except NonFiniteLossError as exc:
        loop.close()
        raise exc
    summary = loop.summary()
    if tasks is not None:   # rows of each dimension fusion read (the experts' stage 1 not included)
        from ..step_plan import rows_seen
        summary["seen_by_dimension"] = rows_seen(tasks, cfg.fusion.train, env.world_size,
                                                 summary["steps"])
    if status == "stopped":
        loop.close()
        log.warning("stop signal %s: checkpoint %s saved; exiting with %d for requeue",
                    loop.stop.name(), loop.last_tag, requeue_requested_exit_code())
        return requeue_requested_exit_code()
    save_consolidated(loop, paths.out, cfg, summary)
    loop.close()
    return 0

"""DeepSpeed helpers (with megablocks_moe.py, the only module that imports deepspeed).

Stages build a ZeRO engine in four calls, independent of which stage they are:

    ds = resolve_ds_config(load_ds_config(path), DsTrainSettings(...))   # before any process group
    init_distributed()                                                   # torch.distributed + DS
    engine = build_engine(model, ds, trainable_params, lr_multiplier=...)  # optimizer + LR
    save_checkpoint(engine, dir, tag, client_state) / load_checkpoint(engine, dir)

`build_engine` returns a `DsEngine`, the shape `pipeline.train.loop.TrainLoop` drives (with
`DsCheckpoints` for resume/saves); the helpers here accept it or a raw DeepSpeed engine.

plus `consolidated_state_dict` (full 16-bit/fp32 weights on rank 0 from a ZeRO-3 engine),
`zero_checkpoint_fp32_state_dict` (offline consolidation of a saved ZeRO checkpoint),
`partition_report` (what this rank really holds) and `set_leaf_modules` (ZeRO-3 leaf modules for
MoE blocks whose parameters must be gathered as a unit).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ..env import accelerator_kind, dist_backend, dist_env, export_dist_env
from ..io_utils import read_json_object
from ..precision import autocast_forward
from .ds_checkpoint_check import LATEST, checkpoint_problem, resume_tag


@dataclass(frozen=True)
class DsTrainSettings:
    """The values a stage's TrainConfig contributes to a DS JSON."""
    micro_batch_size: int
    grad_accum_steps: int
    grad_clip: float
    lr: float
    weight_decay: float
    world_size: int
    # the stage's resolved precision (pipeline.train.mixed_precision): "bf16" turns DeepSpeed's
    # bf16 mode on a GPU (on the CPU, bf16 is autocast and DeepSpeed stays fp32); "fp32" keeps it
    # off; "auto": bf16 on a GPU, fp32 on the CPU
    precision: str = "auto"


def find_ds_config(path: str | Path) -> Path:
    """As given (absolute or relative to the working dir), else relative to the repository, so
    the default `ds_configs/...` works from any working directory."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    in_repo = Path(__file__).resolve().parents[2] / given
    return in_repo if in_repo.exists() else given


def load_ds_config(path: str | Path,
                   require_stage: Optional[int | tuple[int, ...]] = 3) -> dict:
    """Read a DeepSpeed JSON; check it parses and asks for the ZeRO stage (or one of the
    stages) this stage needs."""
    path = find_ds_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    cfg = read_json_object(path)
    stage = cfg.get("zero_optimization", {}).get("stage")
    allowed = (require_stage,) if isinstance(require_stage, int) else require_stage
    if allowed is not None and stage not in allowed:
        raise ValueError(f"{path}: zero_optimization.stage must be "
                         f"{' or '.join(map(str, allowed))}, got {stage!r}")
    if stage == 3 and not cfg["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"):
        # Without it ZeRO-3 model saves hold empty (partitioned) tensors.
        raise ValueError(f"{path}: zero_optimization.stage3_gather_16bit_weights_on_model_save "
                         f"must be true for ZeRO-3")
    cfg["_source"] = str(path)
    return cfg


def _fill(cfg: dict, key: str, value: Any, source: str) -> None:
    given = cfg.get(key, "auto")
    if given == "auto":
        cfg[key] = value
    elif given != value:
        raise ValueError(f"{source}: {key}={given!r} disagrees with the training config ({value!r}); "
                         f"set it to \"auto\" or make them match")


def _fill_optimizer(cfg: dict, s: DsTrainSettings) -> None:
    params = cfg.get("optimizer", {}).get("params")
    if params is None:
        return
    for key, value in (("lr", s.lr), ("weight_decay", s.weight_decay)):
        if params.get(key, "auto") == "auto":
            params[key] = value


def _set_precision(cfg: dict, precision: str, on_gpu: bool, source: str) -> None:
    """DeepSpeed's bf16/fp16 sections from the stage's precision: bf16 mode on a GPU unless the
    precision is fp32; always off on the CPU (fp32, or bf16 by autocast around the forward)."""
    want_bf16 = on_gpu and precision != "fp32"
    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want_bf16 and key == "bf16"
    if not on_gpu:
        cfg["bf16"]["enabled"] = cfg["fp16"]["enabled"] = False
    elif precision != "auto" and (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) \
            != (want_bf16, False):
        raise ValueError(f"{source}: bf16.enabled={cfg['bf16']['enabled']!r}, fp16.enabled="
                         f"{cfg['fp16']['enabled']!r} disagree with the training precision "
                         f"{precision!r}; set them to \"auto\" (the precision setting decides)")


def resolve_ds_config(raw: dict, s: DsTrainSettings, accelerator: Optional[str] = None) -> dict:
    """Fill "auto" values from our config, pick bf16 or fp32 (`s.precision`; see
    `_set_precision`), check batch arithmetic."""
    cfg = copy.deepcopy(raw)
    source = cfg.pop("_source", "<ds config>")
    accelerator = accelerator or accelerator_kind()
    _fill(cfg, "train_micro_batch_size_per_gpu", s.micro_batch_size, source)
    _fill(cfg, "gradient_accumulation_steps", s.grad_accum_steps, source)
    _fill(cfg, "gradient_clipping", s.grad_clip, source)
    global_batch = s.micro_batch_size * s.grad_accum_steps * s.world_size
    if cfg.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ValueError(
            f"{source}: train_batch_size={cfg['train_batch_size']} != micro_batch_size "
            f"{s.micro_batch_size} x grad_accum_steps {s.grad_accum_steps} x world_size "
            f"{s.world_size} = {global_batch}")
    cfg["train_batch_size"] = global_batch
    _fill_optimizer(cfg, s)
    on_gpu = accelerator == "cuda"
    _set_precision(cfg, s.precision, on_gpu, source)
    if not on_gpu:
        # CPU: a torch AdamW client optimizer (lr/weight decay from our config), not
        # DeepSpeed's JIT-compiled CPU Adam that an "optimizer" section would build.
        cfg.pop("optimizer", None)
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def train_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed trains the module's parameters in under this (resolved) config: bf16 or
    fp16 when enabled (GPU), else fp32 (CPU). Build the model in it directly; DeepSpeed would
    otherwise cast a full fp32 copy on the host."""
    if ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def train_device() -> torch.device:
    """This rank's device: its GPU (`init_distributed` selected LOCAL_RANK's) or the CPU."""
    if accelerator_kind() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> None:
    """Create the process group from the launcher's env (torchrun, deepspeed, srun+export)."""
    import deepspeed

    # DeepSpeed calls torch's deprecated collective names on every step; one line each, per rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    env = dist_env()
    export_dist_env(env)  # srun without a launcher sets only SLURM_*; env:// needs RANK etc.
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=dist_backend(), auto_mpi_discovery=False,
                                   distributed_port=env.master_port, verbose=False,
                                   rank=env.rank, world_size=env.world_size)
    if accelerator_kind() == "cuda":
        torch.cuda.set_device(env.local_rank)


def _trainable_groups(params: Iterable) -> list:
    """Parameters or param-group dicts (optional per-group "lr") -> non-empty groups of trainable
    parameters (a plain list stays a plain list)."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        out = [g for g in groups if g["params"]]
    else:
        out = [p for p in items if p.requires_grad]
    if not out:
        raise ValueError("build_engine: no trainable parameters")
    return out


def build_engine(model: torch.nn.Module, ds_config: dict, params: Iterable, lr: float = 1e-3,
                 weight_decay: float = 0.0,
                 lr_multiplier: Optional[Callable[[int], float]] = None,
                 autocast: Optional[torch.dtype] = None) -> "DsEngine":
    """A DeepSpeed engine over `params` (the trainable ones; parameters or param groups), in
    the training loop's engine interface.

    Without an "optimizer" section in the JSON a torch AdamW client optimizer is used. The LR
    schedule is a LambdaLR of `lr_multiplier` (multiplier of `lr` per optimizer step, e.g. a
    `functools.partial` of `train.common.warmup_cosine`); DeepSpeed steps it and checkpoints
    its state. `autocast`: the forward runs under `torch.autocast` in this dtype (CPU bf16:
    `pipeline.train.mixed_precision`); DeepSpeed itself stays in its fp32 mode then.
    """
    import deepspeed

    params = _trainable_groups(params)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = None
    if lr_multiplier is not None:
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return DsEngine(engine, autocast)


class DsEngine:
    """`pipeline.train.loop`'s engine interface over a DeepSpeed engine (`raw`): forward,
    backward and step once per micro batch (DeepSpeed scales by and steps the optimizer at
    the gradient-accumulation boundary), the current LR and the last global grad norm.
    `autocast`: the forward's autocast dtype (None: none)."""

    def __init__(self, raw, autocast: Optional[torch.dtype] = None):
        self.raw, self.autocast = raw, autocast

    @property
    def module(self) -> torch.nn.Module:
        return self.raw.module

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def __call__(self, **inputs):
        with autocast_forward(self.autocast, self.device.type):
            return self.raw(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.raw.backward(loss)

    def step(self) -> None:
        self.raw.step()

    def lr(self) -> float:
        return self.raw.get_lr()[0]

    def grad_norm(self) -> Optional[float]:
        norm = self.raw.get_global_grad_norm()
        return float(norm) if norm is not None else None


class DsCheckpoints:
    """The loop's checkpoint interface: DeepSpeed checkpoints of `engine` under `save_dir`."""

    def __init__(self, engine: DsEngine, save_dir: str | Path):
        self.engine, self.dir = engine, Path(save_dir)
        self._tag: Optional[str] = None

    def latest(self) -> Optional[str]:
        """The newest intact checkpoint (`ds_checkpoint_check.resume_tag`: a damaged newest one
        falls back, another world size is an error); the stage's prepare step announced it."""
        self._tag = resume_tag(self.dir, _world_size(), announce=False)
        return self._tag

    def save(self, tag: str, client_state: dict, rank_state: Optional[dict]) -> None:
        save_checkpoint(self.engine, self.dir, tag, client_state, rank_state)

    def load(self) -> tuple[str, dict, Optional[dict]]:
        return load_checkpoint(self.engine, self.dir, self._tag)


@contextlib.contextmanager
def zero3_init_context(ds_config: dict):
    """Inside it, transformers' `from_pretrained` builds the model already partitioned (ZeRO-3
    zero.Init), so no rank ever holds the full model; outside it behaves as usual."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield keep_alive
    finally:
        unset_hf_deepspeed_config()


def set_leaf_modules(model: torch.nn.Module, classes: list[type]) -> None:
    """Gather these modules' parameters as one unit under ZeRO-3 (needed for MoE blocks whose
    experts run data-dependently; otherwise ranks disagree on which params to fetch)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _raw(engine):
    """The DeepSpeed engine inside a `DsEngine` (helpers below accept either)."""
    return engine.raw if isinstance(engine, DsEngine) else engine


def save_checkpoint(engine, save_dir: str | Path, tag: str, client_state: dict,
                    rank_state: Optional[dict] = None) -> None:
    """All ranks call. Writes model/optimizer/scheduler + `client_state`; `rank_state` (e.g. RNG)
    is kept per rank. `latest` is written only after every rank finished, so a kill mid-save
    leaves the previous checkpoint as the one to resume from."""
    save_dir = Path(save_dir)
    _raw(engine).save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, save_dir / tag / f"rank_state_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        tmp = save_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, save_dir / LATEST)
    _barrier()


def latest_tag(save_dir: str | Path) -> Optional[str]:
    path = Path(save_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def load_checkpoint(engine, save_dir: str | Path,
                    tag: Optional[str] = None) -> tuple[str, dict, Optional[dict]]:
    """Restore `tag` (default: the newest intact checkpoint, `resume_tag`); return
    (tag, client_state, this rank's rank_state)."""
    tag = tag or resume_tag(save_dir, _world_size(), announce=False)
    if tag is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint to resume from in {save_dir} "
                                f"(no '{LATEST}' file)")
    path, client_state = _raw(engine).load_checkpoint(str(save_dir), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{save_dir}/{tag}: DeepSpeed could not load this checkpoint")
    rank_file = Path(save_dir) / tag / f"rank_state_{_rank():05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return tag, client_state or {}, rank_state


def consolidated_state_dict(engine) -> Optional[dict]:
    """All ranks call; rank 0 gets the full (16-bit on GPU, fp32 on CPU) state dict, others None.
    The tensors are host copies, independent of the engine's; tied tensors (one storage under
    two names) are copied once and stay shared."""
    engine = _raw(engine)
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if _rank() != 0:
        return None
    copies: dict = {}
    out = {}
    for key, value in state.items():
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                 tuple(value.shape), tuple(value.stride()), value.dtype)
        if ident not in copies:   # straight to the host: no second copy on the GPU
            copies[ident] = value.detach().to("cpu", copy=True)
        out[key] = copies[ident]
    return out


def zero_checkpoint_fp32_state_dict(checkpoint_dir: str | Path, tag: Optional[str] = None) -> dict:
    """Offline: the fp32 master weights (trainable and frozen) of a saved ZeRO-2/3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint dir not found: {checkpoint_dir}")
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint tag {tag!r} (and no '{LATEST}')")
    problem = checkpoint_problem(checkpoint_dir / tag)
    if problem is not None:   # DeepSpeed would fail with a raw unpickling traceback
        raise ValueError(f"{checkpoint_dir}: damaged checkpoint ({problem}); pass --tag for an "
                         f"older one")
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def partition_report(engine) -> dict:
    """What this rank holds: its ZeRO-3 parameter shards vs the full model, and optimizer state
    (fp32 master partitions + Adam moments; moments exist after the first step)."""
    engine = _raw(engine)
    params = list(engine.module.parameters())
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    local = [getattr(p, "ds_tensor", p) for p in params]
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values()]
    masters = list(getattr(opt, "fp32_partitioned_groups_flat", []))
    return {
        "rank": _rank(),
        "full_param_numel": full,
        "local_param_numel": sum(int(t.numel()) for t in local),
        "local_param_bytes": _tensor_bytes(local),
        "optimizer_state_bytes": _tensor_bytes(state) + _tensor_bytes(masters),
        "optimizer_master_numel": sum(int(t.numel()) for t in masters),
    }

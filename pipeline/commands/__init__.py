"""`h3fusion` command line: one subcommand per stage, each in its own module of this package.

This package is the top floor: the only code that parses arguments. A command module exposes
`add_arguments(parser)` and `main(args) -> int` and calls a library entry point with a typed
config and the run directory; no library module imports `pipeline.commands`
(tests/unit/test_imports.py checks it). Command modules are imported only when their subcommand
runs, so `h3fusion --help` stays fast and needs no deepspeed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Callable

from ..backends import torch_too_old
from ..config import ConfigError, load_config
from ..run_lock import RunDirBusyError

# subcommand -> (module, one-line help)
COMMANDS = {
    "data": ("pipeline.commands.data", "build the HHH datasets (built-in or real) and save them to disk"),
    "tokenizer": ("pipeline.commands.tokenizer", "train the sentencepiece tokenizer (or copy the base model's)"),
    "base": ("pipeline.commands.base", "build the base model: pre-train the tiny Llama, or convert a GGUF"),
    "train-expert": ("pipeline.commands.train_expert", "stage 1: fine-tune one HHH expert under DeepSpeed ZeRO-3"),
    "train-baseline": ("pipeline.commands.train_multitask", "training baselines: dense multi-task FFN fine-tunes (data-/compute-matched), extra-steps control"),
    "surgery": ("pipeline.commands.surgery", "checkpoint surgery tools (build_moe, zero_to_hf, merge_lora, ...)"),
    "fuse": ("pipeline.commands.fuse", "stage 2: train the fused MoE (router, optional experts)"),
    "merge": ("pipeline.commands.merge", "merging baselines: average, task arithmetic, TIES"),
    "ensemble": ("pipeline.commands.ensemble", "LLM-ensemble baselines: probability average, per-prompt router"),
    "evaluate": ("pipeline.commands.evaluate", "stage 3: HHH evaluation report over several models"),
    "profile": ("pipeline.commands.profile", "expert-load profile of a fused model"),
    "run": ("pipeline.commands.run", "run the whole pipeline (data -> ... -> report) on one machine"),
    "aggregate": ("pipeline.commands.aggregate", "mean ± sd across runs with different --seed (same eval items)"),
    "plan": ("pipeline.commands.plan", "will a config fit a cluster? per-GPU and per-node host memory of every training stage"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="preset name (pipeline/presets) or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set expert.train.lr=1e-4 (repeatable)")
    parser.add_argument("--run-dir", default="runs/tiny", help="run directory holding every stage's outputs")


def add_overwrite_argument(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {output}")


def add_resume_arguments(parser: argparse.ArgumentParser, output: str,
                         resume_help: str = "continue from the latest DeepSpeed checkpoint "
                                            "(error if there is none)") -> None:
    """A training stage's --resume and --overwrite (of `output`)."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    add_overwrite_argument(parser, output)


def run_training(command: str, train: Callable[[], int]) -> int:
    """Run a training stage's `train()` with INFO logging; a non-finite loss is one error line
    and exit 3 (no output written)."""
    import logging

    from ..train.loop import NonFiniteLossError
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return train()
    except NonFiniteLossError as exc:
        print(f"h3fusion {command}: error: {exc}", file=sys.stderr, flush=True)
        return 3


def config_from_args(args: argparse.Namespace, section: str = ""):
    """Load the config once; `--set train.lr=...` is read relative to `section` when given."""
    return load_config(args.config, args.overrides, override_prefix=section)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h3fusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    too_old = torch_too_old()   # before the command's modules load: one line, no traceback
    if too_old:
        print(f"h3fusion {name}: error: {too_old}", file=sys.stderr)
        _record_exit_status(2)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"h3fusion {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    # the `deepspeed` launcher appends --local_rank=N; the rank comes from pipeline.env instead
    rest = [a for a in rest if not a.startswith("--local_rank")]
    args = sub.parse_args(rest)
    rc = 1   # an exception that escapes is a failure
    try:
        # H3F_DEVICE=cuda (slurm/lib.sh's GPU mode) and torch sees no GPU: stop before any work
        from ..env import check_requested_device
        check_requested_device()
        with _run_dir_lock(name, args):
            rc = int(module.main(args) or 0)
    # PermissionError: an output in a read-only place (checked before training, named there)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, PermissionError,
            RunDirBusyError) as exc:
        print(f"h3fusion {name}: error: {exc}", file=sys.stderr)
        rc = 2
    finally:
        _record_exit_status(rc)
    return rc


@contextlib.contextmanager
def _run_dir_lock(name: str, args: argparse.Namespace):
    """The run-dir lock for commands that write into `--run-dir` (rank 0 only; see run_lock);
    processes this one starts (`h3fusion run`'s stages) inherit it."""
    from ..env import dist_env, export_run_lock, inherited_run_lock
    from ..run_lock import run_dir_lock

    read_only = getattr(args, "list_stages", False)   # `run --list-stages` writes nothing
    if getattr(args, "run_dir", None) is None or dist_env().rank != 0 or read_only:
        yield
        return
    # `run` owns the whole run dir; a stage command its own stage (one stage lock per expert)
    stage = None if name == "run" else "-".join(filter(None, [name, getattr(args, "dimension", None)]))
    with run_dir_lock(args.run_dir, inherited_run_lock(), stage) as held:
        if held is None:
            yield
            return
        export_run_lock(str(held))
        try:
            yield
        finally:
            export_run_lock(None)


def _record_exit_status(rc: int) -> None:
    """Under pipeline.commands.launch each rank leaves its exit status in a file, because
    torchrun exits 1 after it forwarded a stop signal (the requeue status would be lost)."""
    from ..env import dist_env, exit_status_dir

    where = exit_status_dir()
    if where:
        Path(where, f"rank{dist_env().rank}").write_text(f"{rc}\n")

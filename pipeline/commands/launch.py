"""`python -m pipeline.commands.launch TORCHRUN_ARGS...`: torchrun, with h3fusion's exit statuses.

`h3fusion run` and slurm/lib.sh start every multi-process stage through this wrapper, so both
pass stop signals the same way and both see the same exit status:

- torchrun forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to the ranks
  (`--signals-to-handle`) and gives them `--shutdown-timeout` seconds (pipeline.env
  `shutdown_timeout`) to finish the step, checkpoint and exit; a later option on the command line
  overrides both.
- Only options the installed torchrun knows are added: they are read from its own parser
  (`torch.distributed.run.get_args_parser()`), not assumed from a torch version. torch 2.7 (the
  megablocks set's) has neither. Without `--signals-to-handle` torchrun handles only SIGTERM,
  SIGINT, SIGHUP and SIGQUIT, and SIGUSR1 (SLURM's "time limit ahead", slurm/lib.sh) would kill
  torchrun and with it the ranks, before any checkpoint: this wrapper then installs torch's own
  reaction (raise `SignalException`, which the elastic agent answers by sending the same signal
  to every rank) for the signals torchrun leaves alone, so SIGUSR1 still reaches the ranks.
  What that fallback loses is `--shutdown-timeout`: torch 2.7's agent gives the ranks its fixed
  30 s (`PContext.close`'s default) between the forwarded signal and SIGKILL, not
  H3F_SHUTDOWN_TIMEOUT; a checkpoint that takes longer is cut short (the previous one stays the
  newest intact, docs/reliability.md). One line on stderr says so at start.
- torchrun itself exits 1 with a SignalException traceback after forwarding a signal, even when
  every rank checkpointed and exited with the requeue status (85). Each rank therefore writes its
  exit status into a private directory (pipeline.env `EXIT_STATUS_DIR`, written by
  `pipeline.commands.main`), and this wrapper exits with 85 when every rank that stopped asked for
  a requeue, else with the first failing rank's status (128 + N for a rank killed by signal N),
  else 128 + the signal torchrun received; one line on stderr says which.
- That directory is `h3f-exit-<host>.<pid>.<random>` in the temp dir, removed on exit; a
  launcher killed by SIGKILL cannot remove its own, so every launch first removes those of this
  host whose launcher pid is gone.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from ..env import EXIT_STATUS_DIR, requeue_requested_exit_code, shutdown_timeout
from ..io_utils import pid_alive

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SIGNALS_OPTION, TIMEOUT_OPTION = "--signals-to-handle", "--shutdown-timeout"
EXIT_DIR_PREFIX = "h3f-exit-"


def torchrun_options(parser=None) -> set[str]:
    """Every option string the torchrun argument parser knows (default: the installed torch's)."""
    if parser is None:
        from torch.distributed.run import get_args_parser
        parser = get_args_parser()
    return {option for action in parser._actions for option in action.option_strings}


def torchrun_argv(argv: list[str], known: Optional[Iterable[str]] = None) -> list[str]:
    """h3fusion's signal options first, those of them torchrun knows (`known`: its option
    strings, default the installed torchrun's); argparse lets a later occurrence in `argv` win."""
    known = torchrun_options() if known is None else set(known)
    ours = {SIGNALS_OPTION: f"{SIGNALS_OPTION}={FORWARDED_SIGNALS}",
            TIMEOUT_OPTION: f"{TIMEOUT_OPTION}={shutdown_timeout()}"}
    return [arg for option, arg in ours.items() if option in known] + list(argv)


def fallback_note(known: Iterable[str]) -> Optional[str]:
    """The one line saying what this torchrun lacks and what happens instead (None: nothing)."""
    import torch
    missing = [o for o in (SIGNALS_OPTION, TIMEOUT_OPTION) if o not in set(known)]
    if not missing:
        return None
    notes = []
    if SIGNALS_OPTION in missing:
        notes.append(f"this launcher's own handler makes it forward {FORWARDED_SIGNALS} to "
                     f"the ranks")
    if TIMEOUT_OPTION in missing:
        notes.append(f"ranks get torchrun's fixed 30 s after a signal to checkpoint, not "
                     f"H3F_SHUTDOWN_TIMEOUT={shutdown_timeout()} s")
    return (f"h3fusion launch: torch {torch.__version__}'s torchrun has no {', '.join(missing)}: "
            + "; ".join(notes))


def _raise_signal_exception(signum: int, frame) -> None:  # noqa: ARG001 (handler signature)
    """What torchrun does on a signal it handles: the elastic agent catches the SignalException,
    sends the same signal to every rank and waits for them."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    sig = signal.Signals(signum)
    raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)


def forward_signals_ourselves() -> None:
    """For a torchrun without `--signals-to-handle`: every forwarded signal raises torch's
    SignalException in this (main) thread; torchrun re-registers the ones it handles itself."""
    for name in FORWARDED_SIGNALS.split(","):
        signal.signal(getattr(signal, name), _raise_signal_exception)


def remove_stale_exit_dirs(where: Path) -> list[Path]:
    """Remove this host's exit-status dirs in `where` whose launcher process is gone (killed by
    SIGKILL before it could remove its own); returns them. Other hosts' dirs (a temp dir on a
    shared file system) and unreadable names are left alone."""
    prefix = f"{EXIT_DIR_PREFIX}{socket.gethostname()}."
    removed = []
    for path in where.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split(".")[0]
        if path.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make_exit_dir(where: Optional[Path] = None) -> Path:
    """A new private exit-status dir named after this host and process, after removing stale
    ones."""
    where = Path(tempfile.gettempdir()) if where is None else where
    remove_stale_exit_dirs(where)
    prefix = f"{EXIT_DIR_PREFIX}{socket.gethostname()}.{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))


def rank_statuses(where: Path) -> dict[int, int]:
    """{rank: exit status} of the ranks that got as far as writing one."""
    out = {}
    for path in where.glob("rank*"):
        try:
            out[int(path.name[4:])] = int(path.read_text())
        except ValueError:
            continue
    return out


def requeue_status(statuses: dict[int, int]) -> Optional[int]:
    """85 when at least one rank asked for a requeue and none failed otherwise."""
    code = requeue_requested_exit_code()
    codes = set(statuses.values())
    return code if code in codes and codes <= {0, code} else None


def _signal_status(sig: int) -> int:
    return 128 + sig


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    known = torchrun_options()
    note = fallback_note(known)
    if note:
        print(note, file=sys.stderr)
        if SIGNALS_OPTION not in known:
            forward_signals_ourselves()
    where = make_exit_dir()
    os.environ[EXIT_STATUS_DIR] = str(where)   # the ranks inherit it
    try:
        run(parse_args(torchrun_argv(sys.argv[1:] if argv is None else argv, known)))
        return 0
    except SignalException as exc:
        statuses = rank_statuses(where)
        code = requeue_status(statuses) or _signal_status(int(exc.sigval))
        print(f"h3fusion launch: {exc.sigval.name} forwarded to the ranks; rank exit statuses "
              f"{dict(sorted(statuses.items()))}; exiting with {code}", file=sys.stderr)
        return code
    except ChildFailedError as exc:
        statuses = rank_statuses(where)
        rank, failure = exc.get_first_failure()
        first = failure.exitcode if failure.exitcode >= 0 else _signal_status(-failure.exitcode)
        code = requeue_status(statuses) or first or 1
        print(f"h3fusion launch: rank {rank} exited with {first} (its message is above); rank exit "
              f"statuses {dict(sorted(statuses.items()))}; exiting with {code}", file=sys.stderr)
        return code
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m pipeline.commands.launch TORCHRUN_ARGS...`: torchrun, with h3fusion's exit statuses.

`h3fusion run` and slurm/lib.sh start every multi-process stage through this wrapper, so both
pass stop signals the same way and both see the same exit status:

- torchrun forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to the ranks
  (`--signals-to-handle`) and gives them `--shutdown-timeout` seconds (pipeline.env
  `shutdown_timeout`) to finish the step, checkpoint and exit; a later option on the command line
  overrides both.
- torchrun itself exits 1 with a SignalException traceback after forwarding a signal, even when
  every rank checkpointed and exited with the requeue status (85). Each rank therefore writes its
  exit status into a private directory (pipeline.env `EXIT_STATUS_DIR`, written by
  `pipeline.commands.main`), and this wrapper exits with 85 when every rank that stopped asked for
  a requeue, else with the first failing rank's status (128 + N for a rank killed by signal N),
  else 128 + the signal torchrun received; one line on stderr says which.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ..env import EXIT_STATUS_DIR, requeue_requested_exit_code, shutdown_timeout

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_argv(argv: list[str]) -> list[str]:
    """h3fusion's signal options first; argparse lets a later occurrence in `argv` win."""
    return [f"--signals-to-handle={FORWARDED_SIGNALS}",
            f"--shutdown-timeout={shutdown_timeout()}"] + list(argv)


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

    where = Path(tempfile.mkdtemp(prefix="h3f-exit-"))
    os.environ[EXIT_STATUS_DIR] = str(where)   # the ranks inherit it
    try:
        run(parse_args(torchrun_argv(sys.argv[1:] if argv is None else argv)))
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

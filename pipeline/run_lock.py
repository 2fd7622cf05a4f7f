"""The run-dir lock: one writer per run directory at a time.

`h3fusion run` holds an exclusive `flock` on `<run>/.lock` while it works; a stage command that
writes into a run dir holds it shared plus its own stage lock exclusively (`run_dir_lock`). A
second writer fails at once with a message naming the holder (pid, host, command, start time,
which each holder writes into its lock file). The kernel drops a flock when its holder dies (even
kill -9), so a lock file left behind never blocks a rerun.

Stages that `h3fusion run` starts inherit its lock: it exports the lock path
(`pipeline.env.RUN_LOCK_HELD`) to them, and a stage whose run dir has that lock file does not
lock again (it would deadlock against its own parent). Under torchrun only rank 0 locks: the
other ranks of the same job are not a second writer, and a rank-0 failure stops them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

LOCK_NAME = ".lock"


class RunDirBusyError(RuntimeError):
    """Another live process holds the run dir's lock."""


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return f"an unknown process ({path} unreadable)"
    return (f"pid {info.get('pid')} on host {info.get('host')} "
            f"(`{info.get('command')}`, started {info.get('started')})")


def _held(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)   # also drops the probe's own lock


def _holders(root: Path) -> str:
    """Who holds the run dir: the stage commands holding `.lock.<stage>` files, else the
    `h3fusion run` that wrote `.lock` (stage holders do not write `.lock`)."""
    stages = [p for p in sorted(root.glob(f"{LOCK_NAME}.*")) if _held(p)]
    return "; ".join(_describe(p) for p in stages) or _describe(root / LOCK_NAME)


def _acquire(path: Path, mode: int, root: Path, stack: contextlib.ExitStack) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    stack.callback(os.close, fd)   # closing releases the flock; the file (last holder) stays
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirBusyError(f"run dir {root} is in use by {_holders(root)}; wait for it to "
                              f"finish or stop it (lock: {path})") from None
    return fd


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _remove_if_only_locks(root: Path) -> None:
    """A run dir this command created only to lock it (e.g. it failed on bad input before
    writing anything) is removed again, so bad input leaves nothing behind."""
    entries = list(root.iterdir())
    if all(p.name == LOCK_NAME or p.name.startswith(f"{LOCK_NAME}.") for p in entries):
        for p in entries:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            root.rmdir()


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, inherited: Optional[str] = None,
                 stage: Optional[str] = None) -> Iterator[Optional[Path]]:
    """Hold the run dir for the block; raise RunDirBusyError when that conflicts.

    `stage` None (`h3fusion run`): `<run>/.lock` exclusively. A stage command (`stage` e.g.
    "train-expert-helpful"): `<run>/.lock` shared, so the experts of a SLURM array can train at
    once, and `<run>/.lock.<stage>` exclusively, so the same stage never runs twice at once.
    `inherited`: the lock path a parent already holds for us (`pipeline.env.inherited_run_lock`);
    when it is this run dir's, nothing is locked and None is yielded. Yields `<run>/.lock`."""
    root = Path(run_dir).resolve()
    path = root / LOCK_NAME
    if inherited and Path(inherited).resolve() == path:
        yield None
        return
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if created:   # runs last, while the locks are still held (the stack unwinds in reverse)
            stack.callback(_remove_if_only_locks, root)
        if stage is None:
            _write_holder(_acquire(path, fcntl.LOCK_EX, root, stack))
        else:
            _acquire(path, fcntl.LOCK_SH, root, stack)
            _write_holder(_acquire(root / f"{LOCK_NAME}.{stage}", fcntl.LOCK_EX, root, stack))
        yield path

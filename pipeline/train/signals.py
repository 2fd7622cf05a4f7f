"""SIGUSR1/SIGTERM -> "checkpoint and exit" flag for trainers.

SLURM sends a signal ahead of a time limit or preemption (`--signal=USR1@120`, SIGTERM on
scancel/preempt). Killing the process inside an optimizer step or a checkpoint write would lose
work, so the handler only records the request; the training loop finishes its current step,
saves, and exits with `pipeline.env.requeue_requested_exit_code()`. All ranks must stop at the
same step (a collective checkpoint), so the loop combines the flags with `any_rank_requested`.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Callable, Iterable

DEFAULT_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by a signal handler; read by the training loop between steps."""
    signum: int | None = None
    _previous: dict = field(default_factory=dict, repr=False)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signum is None:
            self.signum = signum

    def install(self, signals: Iterable[int] = DEFAULT_STOP_SIGNALS) -> "StopRequest":
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install` (tests, nested trainers)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


def install_stop_handlers(signals: Iterable[int] = DEFAULT_STOP_SIGNALS) -> StopRequest:
    return StopRequest().install(signals)


def any_rank_requested(local: bool, max_reduce: Callable[[float], float] | None) -> bool:
    """True when any rank saw a stop signal. `max_reduce` all-reduces a float with MAX over
    ranks (None in a single process); the signal may reach only some ranks, or reach them
    during different steps."""
    value = 1.0 if local else 0.0
    return (max_reduce(value) if max_reduce is not None else value) > 0.5


PR_SET_PDEATHSIG = 1   # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl).

    torchrun starts every rank in its own session, so a SIGKILL of the launcher (or of its
    process group) would leave the ranks training on as orphans, still writing into the run dir.
    Called in each torchrun worker and, through `preexec_fn`, in each stage `h3fusion run`
    starts. SIGKILL, not a stop signal: a parent that is gone cannot collect a checkpoint, and the
    run-dir lock is already released. A parent that died before the prctl call is caught by
    `getppid() != parent`. No-op off Linux (no prctl)."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)

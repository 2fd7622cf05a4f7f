import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.train.signals import StopRequest, any_rank_requested, install_stop_handlers


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_without_killing(sig):
    stop = install_stop_handlers()
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signum == sig
        assert stop.name() == signal.Signals(sig).name
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first one recorded
        assert stop.signum == sig
    finally:
        stop.uninstall()


def test_uninstall_restores_previous_handler():
    seen = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        stop = StopRequest().install([signal.SIGUSR1])
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and not stop.requested
    finally:
        signal.signal(signal.SIGUSR1, prev)


def test_any_rank_requested_uses_the_reduction():
    assert any_rank_requested(True, None)
    assert not any_rank_requested(False, None)
    assert any_rank_requested(False, lambda v: max(v, 1.0))   # another rank saw it
    assert not any_rank_requested(False, lambda v: max(v, 0.0))


def test_signal_in_a_busy_loop_lets_the_step_finish():
    """A real separate process: the loop notices the flag between steps and exits cleanly."""
    code = textwrap.dedent("""
        import os, signal, sys
        from pipeline.train.signals import install_stop_handlers
        stop = install_stop_handlers()
        steps = 0
        while not stop.requested:
            steps += 1
            if steps == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        print(steps, stop.name())
        sys.exit(85)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 85, proc.stderr
    assert proc.stdout.split() == ["3", "SIGTERM"]

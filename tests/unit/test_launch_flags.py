"""pipeline/commands/launch.py on every torch the pinned sets allow: the torchrun options it adds
are read from the installed parser (torch 2.13's has `--signals-to-handle` and
`--shutdown-timeout`, torch 2.7's has neither), the fallback still forwards SIGUSR1 to the ranks,
and a launcher killed by SIGKILL leaves no exit-status dir behind for good."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import get_args_parser

from pipeline.commands.launch import (FORWARDED_SIGNALS, fallback_note, forward_signals_ourselves,
                                      make_exit_dir, remove_stale_exit_dirs, torchrun_argv,
                                      torchrun_options)
from pipeline.env import shutdown_timeout

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
NEW_IN_TORCH_2_8_PLUS = ("signals_to_handle", "shutdown_timeout")
# what slurm/lib.sh's h3f_launch passes (without the two signal options, which launch.py adds)
LIB_SH_ARGS = ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--local-addr=node1",
               "--rdzv-endpoint=node1:29500", "--rdzv-id=42", "--rdzv-conf=is_host=1",
               "--max-restarts=0", "--log-dir=/tmp/ranks/node0", "--tee=3",
               "-m", "pipeline.commands", "fuse", "--run-dir", "runs/x"]


def torch27_parser():
    """The installed torchrun parser less the two options torch 2.7's lacks (its run.py has every
    other option lib.sh and `h3fusion run` use)."""
    parser = get_args_parser()
    for action in [a for a in parser._actions if a.dest in NEW_IN_TORCH_2_8_PLUS]:
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            del parser._option_string_actions[option]
    return parser


PARSERS = {"installed": get_args_parser, "torch-2.7-shaped": torch27_parser}


@pytest.mark.parametrize("shape", PARSERS)
def test_the_produced_argv_parses_with_each_torchrun_parser(shape):
    parser = PARSERS[shape]()
    known = torchrun_options(parser)
    argv = torchrun_argv(LIB_SH_ARGS, known)
    args = parser.parse_args(argv)          # argparse exits on an unknown option
    assert args.training_script_args[:1] == ["fuse"] and args.nproc_per_node == "8"
    if shape == "installed":
        assert args.signals_to_handle == FORWARDED_SIGNALS
        assert int(args.shutdown_timeout) == shutdown_timeout()
        assert fallback_note(known) is None
    else:
        assert not any(a.startswith(("--signals", "--shutdown")) for a in argv), argv
        # what launch.py passed before: torch 2.7's torchrun died in its argument parser
        with pytest.raises(SystemExit):
            parser.parse_args([f"--signals-to-handle={FORWARDED_SIGNALS}", "--shutdown-timeout=9",
                               *LIB_SH_ARGS])
        note = fallback_note(known)
        assert "--signals-to-handle, --shutdown-timeout" in note and "fixed 30 s" in note
        assert "\n" not in note


def test_fallback_handler_raises_torch_signal_exception_for_sigusr1():
    previous = {name: signal.getsignal(getattr(signal, name))
                for name in FORWARDED_SIGNALS.split(",")}
    try:
        forward_signals_ourselves()
        with pytest.raises(SignalException) as caught:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)   # the handler runs at the next bytecode; this never finishes
        assert caught.value.sigval == signal.SIGUSR1
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


_WORKER = """\
import ctypes, os, pathlib, signal, sys, time
ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG, as pipeline.train.signals does
def stop(signum, frame):
    pathlib.Path(os.environ["H3F_EXIT_STATUS_DIR"], "rank" + os.environ["RANK"]).write_text("85")
    sys.exit(85)
signal.signal(signal.SIGUSR1, stop)
pathlib.Path(sys.argv[1]).write_text(os.environ["H3F_EXIT_STATUS_DIR"])
time.sleep(60)
"""
# the launcher as under torch 2.7: the two options missing from its torchrun's parser
_LAUNCHER = """\
import sys
from pipeline.commands import launch
known = launch.torchrun_options() - {"--signals-to-handle", "--signals_to_handle",
                                     "--shutdown-timeout", "--shutdown_timeout"}
launch.torchrun_options = lambda parser=None: known
sys.exit(launch.main(sys.argv[1:]))
"""


def test_on_a_torchrun_without_signal_options_sigusr1_still_reaches_the_ranks(tmp_path):
    """SLURM's USR1 (time limit ahead) must become the ranks' checkpoint-and-85, not kill
    torchrun (USR1's default action) and the ranks with it."""
    (tmp_path / "worker.py").write_text(_WORKER)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, "--standalone", "--nproc-per-node=1",
         str(tmp_path / "worker.py"), str(ready)],
        env=dict(ENV, TMPDIR=str(tmp_path)), stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 60
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None and time.time() < end, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        exit_dir = Path(ready.read_text())
        assert exit_dir.name.startswith(f"h3f-exit-{socket.gethostname()}.{proc.pid}.")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 85, err[-3000:]
    assert "has no --signals-to-handle, --shutdown-timeout" in err
    assert "SIGUSR1 forwarded to the ranks; rank exit statuses {0: 85}; exiting with 85" in err
    assert not exit_dir.exists()


def test_stale_exit_dirs_of_dead_launchers_on_this_host_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"h3f-exit-{host}.{dead_pid}.abc123"      # as `kill -9` leaves it
    live = tmp_path / f"h3f-exit-{host}.{os.getpid()}.def456"    # a launcher still running
    other_host = tmp_path / f"h3f-exit-elsewhere.{dead_pid}.ghi789"
    for path in (stale, live, other_host):
        path.mkdir()
    (stale / "rank0").write_text("85\n")
    new = make_exit_dir(tmp_path)
    try:
        assert not stale.exists() and live.is_dir() and other_host.is_dir()
        assert new.name.startswith(f"h3f-exit-{host}.{os.getpid()}.") and new.is_dir()
        assert remove_stale_exit_dirs(tmp_path) == []       # nothing else is stale
    finally:
        new.rmdir()

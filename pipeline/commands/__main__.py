"""`python -m pipeline.commands ...` (what `h3fusion run` and slurm/ launch each stage with)."""
import sys

from ..env import launched_by_torchrun
from ..train.signals import die_with_parent

if launched_by_torchrun():   # first, before the slow imports: no rank outlives its torchrun
    die_with_parent()

from . import main  # noqa: E402


def _exit_rank(rc: int) -> None:
    """Leave a torchrun rank without interpreter finalisation. By now the command has closed its
    files, renamed its outputs into place, destroyed its process group and written its exit
    status; what finalisation would still do is tear down C++ state (gloo/DeepSpeed threads, tensors
    they hold), and that can abort a finished rank ("terminate called without an active
    exception", SIGABRT: seen once in CI after a resumed expert wrote its model), which torchrun
    then reports as a failed job."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


rc = main()
if launched_by_torchrun():
    _exit_rank(rc)
sys.exit(rc)

"""`python -m pipeline.commands ...` (what `h3fusion run` and slurm/ launch each stage with)."""
import sys

from ..env import launched_by_torchrun
from ..train.signals import die_with_parent

if launched_by_torchrun():   # first, before the slow imports: no rank outlives its torchrun
    die_with_parent()

from . import main  # noqa: E402

sys.exit(main())

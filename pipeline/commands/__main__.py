"""`python -m pipeline.commands ...` (what `h3fusion run` and slurm/ launch each stage with)."""
import sys

from . import main

sys.exit(main())

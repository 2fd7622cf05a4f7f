#!/usr/bin/env python
"""Run the `zero_to_hf` surgery tool: same as `h3fusion surgery zero_to_hf ...` (see docs/surgery.md)."""
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # runnable from a plain checkout: the command runs with this repository on the path
    repo = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    os.execv(sys.executable, [sys.executable, "-m", "pipeline.commands", "surgery", "zero_to_hf", *sys.argv[1:]])

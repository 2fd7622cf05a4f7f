#!/usr/bin/env python
"""Run the `merge` surgery tool: same as `h3fusion surgery merge ...` (see docs/surgery.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a plain checkout

from pipeline.surgery import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("merge", sys.argv[1:], prog="merge.py"))

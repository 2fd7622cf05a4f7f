#!/usr/bin/env python
"""Run the `build_moe` surgery tool: same as `h3fusion surgery build_moe ...` (see docs/surgery.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a plain checkout

from pipeline.surgery import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("build_moe", sys.argv[1:], prog="build_moe.py"))

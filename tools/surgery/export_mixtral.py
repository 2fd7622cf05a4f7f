#!/usr/bin/env python
"""Run the `export_mixtral` surgery tool: same as `h3fusion surgery export_mixtral ...` (see docs/surgery.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a plain checkout

from pipeline.surgery import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("export_mixtral", sys.argv[1:], prog="export_mixtral.py"))

#!/usr/bin/env python
"""Run the `zero_to_hf` surgery tool (DeepSpeed ZeRO checkpoint -> HF model dir): same as `h3fusion surgery zero_to_hf ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a plain checkout

from pipeline.surgery import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("zero_to_hf", sys.argv[1:], prog="zero_to_hf.py"))

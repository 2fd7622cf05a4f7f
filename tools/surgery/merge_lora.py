#!/usr/bin/env python
"""Run the `merge_lora` surgery tool (fold a PEFT LoRA adapter into its base): same as `h3fusion surgery merge_lora ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a plain checkout

from pipeline.surgery import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("merge_lora", sys.argv[1:], prog="merge_lora.py"))

"""`h3fusion surgery <tool> ...`: dispatch to one checkpoint-surgery tool (pipeline.surgery.TOOLS).

Tools are imported only when they run, so listing them needs neither their modules nor their
dependencies.
"""
from __future__ import annotations

import argparse

from .surgery import TOOLS, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tools = "\n".join(f"  {name:<16} {spec[3]}" for name, spec in TOOLS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"tools:\n{tools}\n\n`h3fusion surgery <tool> --help` shows a tool's options."
    parser.add_argument("tool", choices=sorted(TOOLS) + sorted(t.replace("_", "-") for t in TOOLS),
                        metavar="TOOL", help="one of: " + ", ".join(TOOLS))
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")


def main(args: argparse.Namespace) -> int:
    return run_tool(args.tool, args.tool_args)

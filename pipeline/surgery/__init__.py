"""Checkpoint surgery: build the fused MoE from dense experts and take it apart again.

Tools (each a module with `add_arguments(parser)` and `main(args) -> int`, run as
`h3fusion surgery <tool> ...` or `python tools/surgery/<tool>.py ...`):
`build_moe`, `extract_expert`, `export_mixtral`, `merge` (pipeline.merging), `zero_to_hf`,
`merge_lora`. `plan` holds the pure key/shape checks, `safetensors_io` the streaming I/O.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# tool name -> (module, add_arguments attribute, main attribute, one-line help)
TOOLS = {
    "build_moe": ("pipeline.surgery.build_moe", "add_arguments", "main",
                  "dense base + aligned experts -> H3Fusion MoE checkpoint"),
    "extract_expert": ("pipeline.surgery.extract_expert", "add_arguments", "main",
                       "one expert of a MoE back out as a dense LlamaForCausalLM"),
    "export_mixtral": ("pipeline.surgery.export_mixtral", "add_arguments", "main",
                       "H3Fusion MoE -> MixtralForCausalLM checkpoint"),
    "merge": ("pipeline.merging", "add_tool_arguments", "tool_main",
              "merging baselines over dense models: average, task_arithmetic, ties"),
    "zero_to_hf": ("pipeline.surgery.zero_to_hf", "add_arguments", "main",
                   "DeepSpeed ZeRO checkpoint -> Hugging Face model dir"),
    "merge_lora": ("pipeline.surgery.lora", "add_arguments", "main",
                   "fold LoRA adapters into dense weights"),
}


def tool_parser(name: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The tool's argument parser and its main function (imports the tool's module)."""
    key = name.replace("-", "_")
    if key not in TOOLS:
        raise ValueError(f"unknown surgery tool {name!r} (tools: {', '.join(TOOLS)})")
    module_name, add_attr, main_attr, help_text = TOOLS[key]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise       # a missing dependency of the tool: keep the traceback
        raise ValueError(f"surgery tool {key!r} is not available: module {module_name} "
                         f"does not exist in this checkout") from None
    parser = argparse.ArgumentParser(prog=prog or f"h3fusion surgery {key}", description=help_text)
    getattr(module, add_attr)(parser)
    return parser, getattr(module, main_attr)


def run_tool(name: str, argv: list[str], prog: str | None = None) -> int:
    """Parse `argv` for tool `name` and run it; bad input is one line on stderr and exit 2."""
    try:
        parser, tool_main = tool_parser(name, prog)
    except ValueError as exc:
        print(f"{prog or 'h3fusion surgery'}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(tool_main(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

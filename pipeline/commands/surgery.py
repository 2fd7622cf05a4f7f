"""`h3fusion surgery <tool> ...`: one checkpoint-surgery tool (the library functions live in
pipeline.surgery and pipeline.surgery.merging; this module holds their options).

Each tool is a pair `(add_arguments, main)` below; library modules are imported only when a tool
runs, so listing the tools needs neither their modules nor their dependencies. tools/surgery/*.py
run the same command (`python -m pipeline.commands surgery <tool>`).
"""
from __future__ import annotations

import argparse
import sys

def _add_max_shard_gb(parser: argparse.ArgumentParser) -> None:
    from ..checkpoint.safetensors_io import DEFAULT_SHARD_BYTES
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024 ** 3,
                        help="largest safetensors shard in GiB")


def _shard_bytes(args: argparse.Namespace) -> int:
    return int(args.max_shard_gb * 1024 ** 3)


def _add_build_moe(parser: argparse.ArgumentParser) -> None:
    from ..registry import ROUTER_INITS
    parser.add_argument("--base", required=True, help="base LlamaForCausalLM dir (attention, "
                        "embeddings, norms, LM head, tokenizer)")
    parser.add_argument("--experts", nargs="+", required=True, metavar="NAME=DIR",
                        help="aligned dense models in expert order, e.g. helpful=DIR harmless=DIR")
    parser.add_argument("--out", required=True, help="output dir of the fused H3Fusion model")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router-init", choices=ROUTER_INITS, default="zeros")
    parser.add_argument("--prompts-data", help="<run>/data: router prompts from sft/<name>/train")
    parser.add_argument("--prompts", help="JSON file {expert name: [prompt, ...]}")
    parser.add_argument("--prompts-per-expert", type=int, default=8)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the base dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --router-init normal")
    _add_max_shard_gb(parser)
    parser.add_argument("--overwrite", action="store_true")


def _build_moe(args: argparse.Namespace) -> int:
    from ..surgery.build_moe import build_moe
    from ..surgery.plan import parse_named_dirs
    if args.prompts_data and args.prompts:
        raise ValueError("give --prompts-data or --prompts, not both")
    build_moe(args.base, parse_named_dirs(args.experts), args.out, top_k=args.top_k,
              router_init=args.router_init, prompts_source=args.prompts_data or args.prompts,
              prompts_per_expert=args.prompts_per_expert, tokenizer=args.tokenizer,
              overwrite=args.overwrite, seed=args.seed, max_shard_bytes=_shard_bytes(args))
    return 0


def _add_extract_expert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--moe", required=True, help="fused H3Fusion model dir")
    parser.add_argument("--expert", required=True, help="expert name (config expert_names)")
    parser.add_argument("--out", required=True, help="output LlamaForCausalLM dir")
    _add_max_shard_gb(parser)
    parser.add_argument("--overwrite", action="store_true")


def _extract_expert(args: argparse.Namespace) -> int:
    from ..surgery.extract_expert import extract_expert
    extract_expert(args.moe, args.expert, args.out, overwrite=args.overwrite,
                   max_shard_bytes=_shard_bytes(args))
    return 0


def _add_export_mixtral(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--moe", required=True, help="fused H3Fusion model dir")
    parser.add_argument("--out", required=True, help="output MixtralForCausalLM dir")
    _add_max_shard_gb(parser)
    parser.add_argument("--overwrite", action="store_true")


def _export_mixtral(args: argparse.Namespace) -> int:
    from ..surgery.export_mixtral import export_mixtral
    export_mixtral(args.moe, args.out, overwrite=args.overwrite, max_shard_bytes=_shard_bytes(args))
    return 0


def _add_merge(parser: argparse.ArgumentParser) -> None:
    from ..surgery.merging import setting_options
    from ..registry import MERGE_METHODS
    parser.add_argument("--method", required=True, choices=MERGE_METHODS)
    parser.add_argument("--base", required=True, help="base LlamaForCausalLM dir (config, "
                        "tokenizer; the origin of the task vectors)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--out", required=True)
    # one flag per setting name of the registered methods; a method refuses those it does not read
    for name, (tp, choices, help_text) in setting_options().items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=tp, default=None,
                            choices=choices, help=help_text)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the base dir)")
    _add_max_shard_gb(parser)
    parser.add_argument("--overwrite", action="store_true")


def _merge(args: argparse.Namespace) -> int:
    from ..surgery.merging import merge_checkpoints, setting_options
    from ..surgery.plan import parse_named_dirs
    given = {name: getattr(args, name) for name in setting_options()
             if getattr(args, name) is not None}
    merge_checkpoints(args.method, args.base, parse_named_dirs(args.models, "--models"),
                      args.out, overwrite=args.overwrite, tokenizer=args.tokenizer,
                      max_shard_bytes=_shard_bytes(args), **given)
    return 0


def _add_zero_to_hf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds-dir", required=True, help="DeepSpeed checkpoint dir (holds 'latest')")
    parser.add_argument("--config-from", required=True,
                        help="HF model dir whose config.json + tokenizer describe the model (the base)")
    parser.add_argument("--out", required=True, help="output HF model dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 2GB")
    parser.add_argument("--overwrite", action="store_true")


def _zero_to_hf(args: argparse.Namespace) -> int:
    from ..backends.zero_to_hf import zero_to_hf
    info = zero_to_hf(args.ds_dir, args.config_from, args.out, args.tag, args.max_shard_size,
                      args.overwrite)
    print(f"wrote {args.out}: {info['num_params']} params ({info['dtype']}) from {args.ds_dir} "
          f"tag {info['tag']}")
    return 0


def _add_merge_lora(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base HF model dir the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter dir")
    parser.add_argument("--out", required=True, help="output HF model dir (merged)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 2GB")
    parser.add_argument("--overwrite", action="store_true")


def _merge_lora(args: argparse.Namespace) -> int:
    from ..checkpoint.merge_lora import merge_lora_dir
    info = merge_lora_dir(args.base, args.adapter, args.out, args.max_shard_size, args.overwrite)
    print(f"wrote {args.out}: LoRA r={info['r']} alpha={info['lora_alpha']} (scale {info['scale']:.4g}) "
          f"merged into {args.base}")
    return 0


# tool name -> (add_arguments, main, one-line help)
TOOLS = {
    "build_moe": (_add_build_moe, _build_moe, "dense base + aligned experts -> H3Fusion MoE checkpoint"),
    "extract_expert": (_add_extract_expert, _extract_expert,
                       "one expert of a MoE back out as a dense LlamaForCausalLM"),
    "export_mixtral": (_add_export_mixtral, _export_mixtral, "H3Fusion MoE -> MixtralForCausalLM checkpoint"),
    "merge": (_add_merge, _merge, "merging baselines over dense models (pipeline.registry.MERGE_METHODS)"),
    "zero_to_hf": (_add_zero_to_hf, _zero_to_hf, "DeepSpeed ZeRO checkpoint -> Hugging Face model dir"),
    "merge_lora": (_add_merge_lora, _merge_lora, "fold LoRA adapters into dense weights"),
}


def run_tool(name: str, argv: list[str]) -> int:
    """Parse `argv` for tool `name` and run it; bad input is one line on stderr and exit 2."""
    key = name.replace("-", "_")
    add, tool_main, help_text = TOOLS[key]
    parser = argparse.ArgumentParser(prog=f"h3fusion surgery {key}", description=help_text)
    add(parser)
    args = parser.parse_args(argv)
    try:
        return int(tool_main(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tools = "\n".join(f"  {name:<16} {spec[2]}" for name, spec in TOOLS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"tools:\n{tools}\n\n`h3fusion surgery <tool> --help` shows a tool's options."
    parser.add_argument("tool", choices=sorted(TOOLS) + sorted(t.replace("_", "-") for t in TOOLS),
                        metavar="TOOL", help="one of: " + ", ".join(TOOLS))
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")


def main(args: argparse.Namespace) -> int:
    return run_tool(args.tool, args.tool_args)

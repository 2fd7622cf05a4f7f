"""Loading the models to evaluate (any HF causal LM) and finding them in a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.layout import RunLayout
from pipeline.registry import MULTITASK_VARIANTS


def pick_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU; H3F_DEVICE (slurm/lib.sh) pins it, and
    H3F_DEVICE=cuda without a usable GPU is an error, never a silent CPU run."""
    from pipeline.env import accelerator_kind
    return torch.device(accelerator_kind())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path, fallback_dir: Optional[Path] = None):
    """The model dir's tokenizer, else `fallback_dir`'s (e.g. `<run>/tokenizer`)."""
    from transformers import AutoTokenizer

    for d in (model_dir, fallback_dir):
        if d is not None and has_tokenizer(d):
            return AutoTokenizer.from_pretrained(d)
    raise FileNotFoundError(f"no tokenizer files in {model_dir}" +
                            (f" or {fallback_dir}" if fallback_dir else ""))


def load_causal_lm(model_dir: str | Path, tokenizer_dir: Optional[Path] = None,
                   device: Optional[torch.device] = None):
    """(model in eval mode on `device`, tokenizer) from a Hugging Face model directory.

    bf16 on CUDA (the 7B models fit one GPU), fp32 on CPU (bf16 matmuls are slow there).
    A fused H3Fusion model always runs its MoE on the torch backend here.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    from transformers import AutoConfig   # `import pipeline` registered model_type "h3fusion"

    device = device or pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "model_type", "") == "h3fusion":
        # same parameters, pure-PyTorch dropless MoE: loads anywhere (a fused model trained with
        # MegaBlocks is evaluated on a CPU-only machine too) and routes identically
        config.moe_backend = "torch"
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    return model, load_tokenizer(model_dir, tokenizer_dir)


def discover_models(run_dir: str | Path) -> dict[str, Path]:
    """Every model present in a run dir, in report order: base, experts, merges, training
    baselines (`multitask_<variant>`, `more_<dim>`: docs/baselines.md), fused.

    Merges are named `merge_<method>`; a directory counts when it holds a config.json. Experts
    are looked for under the names of the run data's dimensions (`<run>/data` must exist).
    """
    run = RunLayout.at(run_dir)
    found: dict[str, Path] = {}
    if (run.base / "config.json").is_file():
        found["base"] = run.base
    from pipeline.data.loading import data_dimensions
    for task in data_dimensions(run.data):   # the run's dimensions, in expert order
        if (run.expert(task) / "config.json").is_file():
            found[task] = run.expert(task)
    merges = run.root / "merges"
    if merges.is_dir():
        for d in sorted(merges.iterdir()):
            if (d / "config.json").is_file():
                found[f"merge_{d.name}"] = d
    for variant in MULTITASK_VARIANTS:   # registry order: data_matched, compute_matched
        if (run.baseline(f"multitask_{variant}") / "config.json").is_file():
            found[f"multitask_{variant}"] = run.baseline(f"multitask_{variant}")
    for task in data_dimensions(run.data):   # experts trained as long as fusion trained them
        if (run.baseline(f"extra_steps/{task}") / "config.json").is_file():
            found[f"more_{task}"] = run.baseline(f"extra_steps/{task}")
    if (run.fused / "config.json").is_file():
        found["fused"] = run.fused
    if not found:
        raise FileNotFoundError(f"no models (dirs with config.json) under {run.root}: looked in "
                                f"base, experts/<task>, merges/<method>, fused")
    return found


def parse_model_specs(specs: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """['base=DIR', 'chat=DIR@chat'] -> ({'base': Path(DIR), 'chat': Path(DIR)}, {'chat': 'chat'})
    (names unique, order kept; `@<format>` picks a prompt format, pipeline.eval.prompts)."""
    from .prompts import PROMPT_FORMATS, parse_prompt_format

    models: dict[str, Path] = {}
    formats: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models: expected NAME=DIR or NAME=DIR@FORMAT, got {spec!r}")
        if name in models:
            raise ValueError(f"--models: model name {name!r} given twice")
        path, fmt = parse_prompt_format(path)
        head, at, tail = path.rpartition("@")
        if fmt is None and at and Path(head).is_dir() and not Path(path).exists():
            raise ValueError(f"--models {spec!r}: unknown prompt format {tail!r} after '@' "
                             f"(known: {list(PROMPT_FORMATS)})")
        models[name] = Path(path)
        if fmt is not None:
            formats[name] = fmt
    return models, formats


def chat_template_of(model_dir: Path, tokenizer_dir: Optional[Path] = None) -> Optional[str]:
    """The chat template of the tokenizer the model loads with (`load_tokenizer`'s rule: the
    model dir's own, else `tokenizer_dir`'s), None when it has none or no tokenizer at all."""
    try:
        tokenizer = load_tokenizer(Path(model_dir), tokenizer_dir)
    except FileNotFoundError:
        return None
    return getattr(tokenizer, "chat_template", None) or None


def check_prompt_formats(formats: dict[str, str], models: dict[str, Path],
                         tokenizer_dir: Optional[Path] = None) -> None:
    """Before any model loads: every entry names an evaluated model and a known prompt format
    (pipeline.eval.prompts), and a model asked for `chat` has a tokenizer with a chat template
    (one error naming its dir)."""
    from .prompts import CHAT, check_prompt_format

    for name, fmt in formats.items():
        if name not in models:
            raise ValueError(f"prompt format given for {name!r}, which is not an evaluated model "
                             f"(models: {list(models)})")
        check_prompt_format(fmt, f"model {name!r}")
        if fmt == CHAT and chat_template_of(models[name], tokenizer_dir) is None:
            raise ValueError(f"model {name!r}: the chat prompt format needs a tokenizer with a chat "
                             f"template, and the model dir {models[name]} has none (no "
                             f"chat_template.jinja or tokenizer_config.json chat_template)")


def with_base_chat(models: dict[str, Path], tokenizer_dir: Optional[Path] = None
                   ) -> tuple[dict[str, Path], dict[str, str]]:
    """`models` with `base_chat` (the base in its own chat template) right after `base` when the
    base's tokenizer has a chat template, and the prompt formats that are not Alpaca."""
    from .prompts import BASE_CHAT, CHAT

    if "base" not in models or chat_template_of(models["base"], tokenizer_dir) is None:
        return dict(models), {}
    out: dict[str, Path] = {}
    for name, path in models.items():
        out[name] = path
        if name == "base":
            out[BASE_CHAT] = path
    return out, {BASE_CHAT: CHAT}

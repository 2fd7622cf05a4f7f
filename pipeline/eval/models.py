"""Loading the models to evaluate (any HF causal LM) and finding them in a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipeline.layout import RunLayout


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
    baselines (`multitask`, `more_<dim>`: docs/baselines.md), fused.

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
    if (run.baseline("multitask") / "config.json").is_file():
        found["multitask"] = run.baseline("multitask")
    for task in data_dimensions(run.data):   # experts trained as long as fusion trained them
        if (run.baseline(f"extra_steps/{task}") / "config.json").is_file():
            found[f"more_{task}"] = run.baseline(f"extra_steps/{task}")
    if (run.fused / "config.json").is_file():
        found["fused"] = run.fused
    if not found:
        raise FileNotFoundError(f"no models (dirs with config.json) under {run.root}: looked in "
                                f"base, experts/<task>, merges/<method>, fused")
    return found


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """['base=DIR', 'fused=DIR'] -> {'base': Path(DIR), ...} (names unique, order kept)."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models: expected NAME=DIR, got {spec!r}")
        if name in models:
            raise ValueError(f"--models: model name {name!r} given twice")
        models[name] = Path(path)
    return models

"""Loading the models to evaluate (any HF causal LM) and finding them in a run directory."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.layout import RunLayout
from pipeline.precision import PrecisionModes, resolve_precision
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


@dataclass(frozen=True)
class EvalPrecision(PrecisionModes):
    """What `eval.precision` means for one loaded model (pipeline.precision):

    - "fp32": fp32 weights and compute.
    - "bf16" on the CPU (needs avx512_bf16 / AMX; `check_precision` raises otherwise): fp32
      weights, every forward under `torch.autocast("cpu", bfloat16)` (`compute_context`): the
      matmuls run in bf16, norms, softmax and the residual stream stay fp32 (autocast's policy);
      log-likelihoods take the LM head and the log-softmax in fp32 (scoring._token_log_likelihoods).
      Chosen over bf16 weights on the SmolLM2 base: those score 10-25 % and decode 8-50 %
      faster but double the log-likelihood error (docs/performance.md, section 6).
    - "bf16" on CUDA (and CUDA "auto"): bf16 weights, as the pipeline always did (7B fits one GPU).
    """
    requested: str          # eval.precision: auto | fp32 | bf16
    resolved: str           # fp32 | bf16
    device_type: str        # cpu | cuda
    AUTOCAST_MODE = "torch.autocast bf16 compute, fp32 weights; LM head and log-softmax of scores in fp32"
    BF16_MODE = "bf16 weights; log-softmax of scores in fp32"

    @classmethod
    def resolve(cls, requested: str, device_type: str) -> "EvalPrecision":
        return cls(requested, resolve_precision(requested, device_type, "eval.precision"), device_type)

    @property
    def weights_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.resolved == "bf16" and self.device_type != "cpu" else torch.float32


def resolve_eval_precision(cfg):
    """(cfg with `precision` resolved on this machine's device: "fp32"/"bf16", its EvalPrecision).

    Called before any model loads (bf16 on a CPU without it fails there). The resolved name is
    what result keys, resume fingerprints and report.json's config carry, so a bf16 result is
    never reused for an fp32 request ("auto" on CUDA is bf16, on the CPU fp32) and `auto` on a
    CPU matches `fp32`."""
    prec = EvalPrecision.resolve(cfg.precision, pick_device().type)
    return dataclasses.replace(cfg, precision=prec.resolved), prec


def compute_context(model):
    """The context every forward of an evaluated model runs in: `torch.autocast` for CPU bf16
    (EvalPrecision.autocast, set by load_causal_lm), else nothing. Entered once per scoring or
    generation call, so autocast casts each weight once per call, not per forward."""
    precision = getattr(model, "eval_precision", None)
    if precision is None or precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(precision.device_type, dtype=precision.autocast)


def load_causal_lm(model_dir: str | Path, tokenizer_dir: Optional[Path] = None,
                   device: Optional[torch.device] = None, precision: str = "auto"):
    """(model in eval mode on `device`, tokenizer) from a Hugging Face model directory.

    `precision` (eval.precision; EvalPrecision): "auto" = bf16 on CUDA (the 7B models fit one
    GPU), fp32 on CPU; bf16 on a CPU without bf16 instructions is a ValueError raised before
    anything loads. The model carries its EvalPrecision as `model.eval_precision`.
    A fused H3Fusion model always runs its MoE on the torch backend here.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    device = device or pick_device()
    prec = EvalPrecision.resolve(precision, device.type)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    from transformers import AutoConfig   # `import pipeline` registered model_type "h3fusion"

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "model_type", "") == "h3fusion":
        # same parameters, pure-PyTorch dropless MoE: loads anywhere (a fused model trained with
        # MegaBlocks is evaluated on a CPU-only machine too) and routes identically
        config.moe_backend = "torch"
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config,
                                                 dtype=prec.weights_dtype).to(device).eval()
    model.eval_precision = prec
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

"""Typed pipeline configuration: YAML -> validated dataclasses, once, at the CLI.

One dataclass per stage (`data`, `tokenizer`, `base`, `expert`, `fusion`, `eval`, `profile`),
grouped in `PipelineConfig`. A YAML file (or a preset name from `pipeline/presets/`) gives
values; `--set a.b=c` overrides them with YAML-typed values. Unknown keys and wrong types are
one `ConfigError` naming the key and the file. Functions downstream take a sub-config.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from .config_ranges import first_range_problem
# the schema, re-exported: `from pipeline.config import EvalConfig` is the public name
from .config_schema import (
    TrainConfig, BuiltinDataConfig, RealDataConfig, DataConfig, TokenizerConfig,
    TinyModelConfig, BaseConfig, LoraConfig, ExpertConfig, FusionConfig, FUSION_LORA_TARGETS,
    MergeConfig, BaselinesConfig, EvalConfig, ProfileConfig, DimensionSpec,
    PipelineConfig,
)
from .dimensions import register_dimension, resolve_dimensions
from .registry import (PRECISIONS, MERGE_METHODS, MOE_BACKENDS, MULTITASK_VARIANTS, ROUTER_INITS, TRAINABLE_SETS,
                       Registry)

PRESET_DIR = Path(__file__).parent / "presets"
# fusion.gate_tokens (pipeline.train.fusion.losses.gate_token_mask computes each)
GATE_TOKENS = ("all", "response", "first_response")


__all__ = [  # the schema classes are public here, beside the loading and checks
    "TrainConfig", "BuiltinDataConfig", "RealDataConfig", "DataConfig", "TokenizerConfig",
    "TinyModelConfig", "BaseConfig", "LoraConfig", "ExpertConfig", "FusionConfig", "MergeConfig",
    "BaselinesConfig", "EvalConfig", "ProfileConfig", "DimensionSpec", "PipelineConfig",
    "ConfigError", "GATE_TOKENS", "PRESET_DIR", "load_config", "parse_overrides",
    "resolve_config_path", "to_dict", "dump_yaml", "validate", "check_dimensions", "check_dimension",
]


class ConfigError(ValueError):
    """A configuration problem, with the key and source named in the message."""


# ----------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, source)
        for option in inner:   # e.g. `str | list[str]`: the first type the value has
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in inner)
        raise ConfigError(f"{source}: key '{key}' must be {names}, got {type(value).__name__} "
                          f"{value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads '1e-4' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(
            f"{source}: key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in known:
            full = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{source}: unknown config key '{full}' (known: {sorted(known)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source)
              for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str], prefix: str = "") -> dict:
    """['a.b=1', 'c=x'] -> nested dict with YAML-parsed values, keys under `prefix`."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = f"{prefix}.{key}" if prefix and not key.startswith(prefix + ".") else key
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset in pipeline/presets/."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no config file or preset named '{name_or_path}' (presets: {names})")
    return preset


def load_config(name_or_path: str = "tiny", overrides: Optional[list[str]] = None,
                override_prefix: str = "") -> PipelineConfig:
    """Load a preset/YAML, apply `--set` overrides, validate; raise ConfigError on any problem."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    if data is None:   # an empty file would silently run every default
        raise ConfigError(f"{path}: empty config file (start from a preset in {PRESET_DIR})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    cfg = _build(PipelineConfig, data, "", str(path))
    if overrides:
        merged = _deep_merge(to_dict(cfg), parse_overrides(overrides, override_prefix))
        cfg = _build(PipelineConfig, merged, "", f"{path} + --set")
    validate(cfg, str(path) + (" + --set" if overrides else ""))
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_registered(registry: Registry, name: str, key: str, source: str) -> None:
    try:
        registry.check(name, key)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def validate(cfg: PipelineConfig, source: str = "config") -> None:
    """Value checks that types alone cannot express; every message names `source` (the file)."""
    try:
        _validate(cfg, source)
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{source}: {exc}") from None


def _validate(cfg: PipelineConfig, source: str) -> None:
    check_dimensions(cfg, source)
    _check(cfg.data.source in ("builtin", "real"), f"data.source must be builtin|real, got {cfg.data.source!r}")
    _check(not (cfg.base.path and cfg.base.gguf),
           f"set at most one of base.path ({cfg.base.path!r}) and base.gguf ({cfg.base.gguf!r})")
    _check(not (cfg.base.gguf and cfg.tokenizer.path),
           f"tokenizer.path ({cfg.tokenizer.path!r}) cannot be combined with base.gguf: with a GGUF "
           f"base the tokenizer stage uses the GGUF file's own tokenizer")
    _check(cfg.expert.method in ("ffn", "lora"), f"expert.method must be ffn|lora, got {cfg.expert.method!r}")
    real = cfg.data.real
    _check(not real.harmless_benign_rows or 0 < real.harmless_benign_rows < real.max_train_per_task,
           f"data.real.harmless_benign_rows ({real.harmless_benign_rows}) must be below "
           f"data.real.max_train_per_task ({real.max_train_per_task}, which must then be set): "
           "the benign rows share the harmless training cap with the refusal rows")
    f = cfg.fusion
    _check_registered(TRAINABLE_SETS, f.trainable, "fusion.trainable", source)
    bad_targets = [t for t in f.lora.target_modules if t not in FUSION_LORA_TARGETS]
    _check(f.lora.target_modules and not bad_targets,
           f"fusion.lora.target_modules {f.lora.target_modules}: fusion's LoRA wraps only the "
           f"attention projections {list(FUSION_LORA_TARGETS)} (the experts are stacked tensors, "
           f"not nn.Linear layers); not allowed: {bad_targets or 'an empty list'}")
    _check_registered(ROUTER_INITS, f.router_init, "fusion.router_init", source)
    _check_registered(MOE_BACKENDS, f.moe_backend, "fusion.moe_backend", source)
    _check(f.gate_tokens in GATE_TOKENS,
           f"fusion.gate_tokens must be {'|'.join(GATE_TOKENS)}, got {f.gate_tokens!r}")
    _check(cfg.profile.tokens in ("response", "all"),
           f"profile.tokens must be response|all, got {cfg.profile.tokens!r}")
    _check_merge(cfg, source)
    _check_multitask_variants(cfg, source)
    _check_precisions(cfg, source)
    _check_hub_specs(cfg)
    problem = first_range_problem(cfg)
    _check(problem is None, f"{source}: {problem}")
    # a generation prompt keeps its last eval.max_seq_len - eval.max_new_tokens tokens
    _check(cfg.eval.max_new_tokens < cfg.eval.max_seq_len,
           f"eval.max_new_tokens ({cfg.eval.max_new_tokens}) must be below eval.max_seq_len "
           f"({cfg.eval.max_seq_len}): a generation prompt keeps only its last max_seq_len - "
           f"max_new_tokens tokens; raise eval.max_seq_len")


def _check_merge(cfg: PipelineConfig, source: str) -> None:
    """Registered method names, and every registered method's settings as the `merge.*` keys
    give them (also the methods not in merge.methods: a bad value is not kept for later), by
    the method's own checks (pipeline.surgery.merging.MergeMethod)."""
    for i, m in enumerate(cfg.merge.methods):
        _check_registered(MERGE_METHODS, m, f"merge.methods[{i}]", source)
    for name in MERGE_METHODS.names():
        try:
            MERGE_METHODS.get(name, "merge method").config_settings(cfg.merge)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _check_multitask_variants(cfg: PipelineConfig, source: str) -> None:
    """Registered names (checked even with multitask off: a typo is not silently kept), each
    once, and at least one when the multi-task baselines are on."""
    variants = cfg.baselines.multitask_variants
    for i, v in enumerate(variants):
        _check_registered(MULTITASK_VARIANTS, v, f"baselines.multitask_variants[{i}]", source)
    _check(len(set(variants)) == len(variants),
           f"baselines.multitask_variants {variants} names a variant twice")
    _check(variants or not cfg.baselines.multitask,
           f"baselines.multitask is true but baselines.multitask_variants is empty: name at least "
           f"one of {list(MULTITASK_VARIANTS.names())} (or set baselines.multitask=false)")


def _check_precisions(cfg: PipelineConfig, source: str) -> None:
    """Registered names; whether bf16 can run is checked where the device is known (the stage,
    and `h3fusion run` before its first stage: pipeline.precision.check_precision)."""
    for key, train in (("base", cfg.base.train), ("expert", cfg.expert.train),
                       ("fusion", cfg.fusion.train)):
        _check_registered(PRECISIONS, train.precision, f"{key}.train.precision", source)
    _check_registered(PRECISIONS, cfg.eval.precision, "eval.precision", source)


def _check_hub_specs(cfg: PipelineConfig) -> None:
    """`hf:` values are well-formed hub ids (pipeline.checkpoint.hub; whether they can be fetched is checked
    when a stage, or `h3fusion run` before its first stage, resolves them)."""
    from .checkpoint.hub import is_hub_spec, parse_dataset_spec, parse_model_spec
    try:
        for key, value in (("base.path", cfg.base.path), ("tokenizer.path", cfg.tokenizer.path)):
            if is_hub_spec(value):
                parse_model_spec(value, key)
        for f in dataclasses.fields(cfg.data.real):
            value = getattr(cfg.data.real, f.name)
            if is_hub_spec(value):
                parse_dataset_spec(value, f"data.real.{f.name}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_dimensions(cfg: PipelineConfig, source: str = "config") -> None:
    """`dimensions` name registered or declared dimensions; per-dimension mappings name exactly
    those (an empty one is filled with its default for every dimension)."""
    try:
        dims = resolve_dimensions(cfg.dimensions, cfg.dimension_defs)
        for d in dims:   # a declared dimension's loader must import now, not stages later
            if d.name in cfg.dimension_defs:
                d.real_loader() if cfg.data.source == "real" else d.builtin_generator()
                register_dimension(d, replace=True)   # known to this process's later stages
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    names = [d.name for d in dims]
    if cfg.data.source == "real":
        lacking = [d.name for d in dims if not d.real]
        _check(not lacking, f"{source}: data.source is 'real' but dimensions {lacking} have no "
                            f"real-data loader (dimension_defs.<name>.real)")
    for key, default in (("gamma", 0.0), ("mix_weights", 1.0)):
        given = getattr(cfg.fusion, key)
        if not given:
            setattr(cfg.fusion, key, {n: default for n in names})
            continue
        unknown, missing = [k for k in given if k not in names], [n for n in names if n not in given]
        _check(not unknown, f"{source}: fusion.{key} names unknown dimensions {unknown} "
                            f"(dimensions: {names})")
        _check(not missing, f"{source}: fusion.{key} lacks dimensions {missing}: give every "
                            f"dimension of {names} a value")


def check_dimension(cfg: PipelineConfig, name: str) -> str:
    """`name` must be one of the run's dimensions (e.g. `train-expert --dimension`)."""
    _check(name in cfg.dimensions, f"unknown dimension {name!r} (this run's dimensions: {cfg.dimensions})")
    return name

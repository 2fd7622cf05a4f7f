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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config_ranges import first_range_problem
from .data.dimensions import DEFAULT_DIMENSIONS, register_dimension, resolve_dimensions
from .registry import MERGE_METHODS, MOE_BACKENDS, ROUTER_INITS, TIES_TRIM_SCOPES, Registry

PRESET_DIR = Path(__file__).parent / "presets"
# fusion.gate_tokens (pipeline.losses.gate_token_mask computes each)
GATE_TOKENS = ("all", "response", "first_response")


class ConfigError(ValueError):
    """A configuration problem, with the key and source named in the message."""


@dataclass
class TrainConfig:
    lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int = -1               # > 0 overrides epochs
    micro_batch_size: int = 8         # per process
    grad_accum_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1234
    log_every: int = 10
    save_every: int = 0               # 0 = only at the end
    max_seq_len: int = 128


@dataclass
class BuiltinDataConfig:
    train_per_task: int = 600
    dev_per_task: int = 60
    test_per_task: int = 120
    pretrain_per_task: int = 1200     # "web text" documents per task for the tiny base
    seed: int = 0


@dataclass
class RealDataConfig:
    """Paths to local copies (or hub names) of the real datasets; None = not used."""
    alpaca: Optional[str] = None
    beavertails: Optional[str] = None
    truthfulqa: Optional[str] = None
    truthfulqa_mc: Optional[str] = None
    alpaca_eval: Optional[str] = None
    # held-out safety sets (harmless eval only; never trained on): docs/data.md
    harmbench: Optional[str] = None   # test harmful prompts: .txt (one per line) or records
    donotanswer: Optional[str] = None  # dev harmful prompts: a dir of *.jsonl or one file
    safety_pairs: Optional[str] = None  # test pairs: pyrit objective CSVs (dir or one file)
    advbench: Optional[str] = None    # optional extra test harmful prompts (off by default)
    # extra harmless SFT prompts (harmful requests, trained with refusal targets), e.g. AdvBench;
    # never one of the eval sets above; near-duplicates of any eval prompt dropped (docs/data.md)
    harmless_train_prompts: Optional[str] = None
    donotanswer_dev_size: int = 200   # seeded dev sample of Do-Not-Answer; 0 = all
    max_benign_per_split: int = 200   # AlpacaEval over-refusal prompts per eval split; 0 = all
    max_train_per_task: int = 0       # 0 = all
    # benign Alpaca rows (with their answers) in the harmless training set, within the cap:
    # the harmless expert then refuses harmful requests only (pipeline/data/real.py, docs/data.md)
    harmless_benign_rows: int = 0
    max_eval_per_task: int = 0
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "builtin"           # builtin | real
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)
    real: RealDataConfig = field(default_factory=RealDataConfig)


@dataclass
class TokenizerConfig:
    vocab_size: int = 1024
    path: Optional[str] = None        # a user's tokenizer dir; None = train sentencepiece


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256


@dataclass
class BaseConfig:
    path: Optional[str] = None        # a user's HF model dir; None = build the tiny base
    gguf: Optional[str] = None        # convert this GGUF file (or pkg:MODULE) once into an HF model;
                                      # the tokenizer stage then takes the GGUF's tokenizer
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])


@dataclass
class ExpertConfig:
    method: str = "ffn"               # ffn | lora
    lora: LoraConfig = field(default_factory=LoraConfig)
    ds_config: str = "ds_configs/zero3_expert.json"
    num_procs: int = 2
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FusionConfig:
    # experts per token; the fused model stores it as `num_experts_per_tok` (Mixtral's name)
    top_k: int = 2
    router_init: str = "zeros"        # pipeline.registry.ROUTER_INITS: zeros | normal | prompts
    trainable: str = "router"         # router | router+lora | router+experts
    lora: LoraConfig = field(default_factory=LoraConfig)
    lambda_gate: float = 0.01
    # tokens the gating loss averages over: "all" non-padding tokens (the paper) or "response"
    # tokens only (the prompt's shared template header carries no task signal; docs/stage2.md),
    # or "first_response": only the position that predicts the first response token
    gate_tokens: str = "all"
    router_lr: Optional[float] = None  # the routers' lr (None = train.lr; experts/LoRA use train.lr)
    # per dimension; {} = every configured dimension with 0 (gamma) / 1 (mix_weights), filled in
    # by validate(); a non-empty mapping must name exactly the configured dimensions
    gamma: dict[str, float] = field(default_factory=dict)
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    mix_weights: dict[str, float] = field(default_factory=dict)
    moe_backend: str = "torch"        # pipeline.registry.MOE_BACKENDS: torch | megablocks
    ep_degree: int = 1
    ds_config: str = "ds_configs/zero2_fusion_ep.json"
    num_procs: int = 2
    collapse_threshold: float = 0.95
    collapse_steps: int = 50
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class MergeConfig:
    methods: list[str] = field(default_factory=lambda: ["average", "task_arithmetic", "ties"])
    task_arithmetic_scale: float = 0.5
    ties_density: float = 0.5
    ties_scale: float = 1.0
    # pipeline.registry.TIES_TRIM_SCOPES: model (the TIES paper: one threshold over the whole
    # task vector) | tensor (mergekit: per tensor)
    ties_trim_scope: str = "model"


@dataclass
class BaselinesConfig:
    """Training baselines (docs/baselines.md), each one more model in the report; off by default
    (multitask costs about one stage 1 plus fusion, extra_steps one fusion length per dimension)."""
    multitask: bool = False           # dense FFN-only fine-tune of the base on the fusion mix
    extra_steps: bool = False         # each expert trained fusion's steps more on its own data


@dataclass
class EvalConfig:
    max_items_per_task: int = 0       # 0 = all
    batch_size: int = 16
    max_new_tokens: int = 48
    generate: bool = True
    # TruthfulQA MC also in lm-evaluation-harness's protocol (6-shot primer; mc1/mc2_harness): on
    # SmolLM2 it is 60 % of a model's evaluation (the primer is scored per question), so the
    # smollm2 preset turns it off and docs/smollm2.md gives the one-model command
    harness_mc: bool = True
    split: str = "test"               # eval/<task>/<split>
    max_seq_len: int = 512            # prompt+answer tokens scored (capped by the model's positions)
    do_sample: bool = False           # generations: greedy (False) or sampled
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0                     # sampled generations and the bootstrap's resample draws
    # bootstrap resamples per interval: 10000 keeps the 2.5 %/97.5 % percentiles' Monte Carlo
    # error well below the intervals' width, and a 9-model, 3-dimension report takes < 1 s
    n_boot: int = 10_000
    # human refusal labels the refusal judge is checked against: "auto" = the shipped
    # ../shared/data/safety/refusal_labels if present; a folder of CSVs or one CSV; "none"
    refusal_labels: str = "auto"
    # dimension -> score metrics to try, in order, instead of the dimension's registered ones
    # (pipeline.data.dimensions); {} = the registry's. E.g. the tiny preset scores harmless by
    # pair preference: its models' generations on unseen prompts are not text a refusal judge
    # can read (README "Latest tiny report").
    score_metrics: dict[str, list[str]] = field(default_factory=dict)
    # an earlier report dir (its report.json): a model whose weights, eval items and per-model
    # settings are identical to one evaluated there takes its results instead of being evaluated
    # again (pipeline.eval.reuse; e.g. seeds that share stage 1); "" = evaluate every model
    reuse_from: str = ""


@dataclass
class ProfileConfig:
    max_items_per_task: int = 64
    batch_size: int = 16
    split: str = "dev"                # sft/<task>/<split> (eval/<task>/<split> if absent)
    max_seq_len: int = 256
    collapse_threshold: float = 0.95  # an expert with more top-1 share than this = collapsed
    # which tokens count: "response" (the answer tokens, where routing decides what is said;
    # the Alpaca header is identical across tasks, so no causal router can tell tasks apart
    # there) or "all" non-padding tokens
    tokens: str = "response"


@dataclass
class DimensionSpec:
    """A dimension that is not built in (fields: pipeline.data.dimensions.Dimension)."""
    builtin: Optional[str] = None     # "module:function" built-in corpus generator
    real: Optional[str] = None        # "module:function" real-data loader
    real_inputs: list[str] = field(default_factory=list)
    eval_kinds: list[str] = field(default_factory=lambda: ["pair"])
    web_aligned: float = 0.5
    score_metrics: list[str] = field(default_factory=lambda: ["pref_acc"])


@dataclass
class PipelineConfig:
    name: str = "custom"
    # the alignment dimensions = experts, in expert / task_label order (docs/contracts.md)
    dimensions: list[str] = field(default_factory=lambda: list(DEFAULT_DIMENSIONS))
    dimension_defs: dict[str, DimensionSpec] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


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
        return _coerce(value, inner[0], key, source)
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
    _check(f.trainable in ("router", "router+lora", "router+experts"),
           f"fusion.trainable must be router|router+lora|router+experts, got {f.trainable!r}")
    _check_registered(ROUTER_INITS, f.router_init, "fusion.router_init", source)
    _check_registered(MOE_BACKENDS, f.moe_backend, "fusion.moe_backend", source)
    _check(f.gate_tokens in GATE_TOKENS,
           f"fusion.gate_tokens must be {'|'.join(GATE_TOKENS)}, got {f.gate_tokens!r}")
    _check(cfg.profile.tokens in ("response", "all"),
           f"profile.tokens must be response|all, got {cfg.profile.tokens!r}")
    for i, m in enumerate(cfg.merge.methods):
        _check_registered(MERGE_METHODS, m, f"merge.methods[{i}]", source)
    _check_registered(TIES_TRIM_SCOPES, cfg.merge.ties_trim_scope, "merge.ties_trim_scope", source)
    problem = first_range_problem(cfg)
    _check(problem is None, f"{source}: {problem}")


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

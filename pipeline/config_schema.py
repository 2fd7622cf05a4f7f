"""The pipeline's config schema: one dataclass per stage, grouped in `PipelineConfig`.

Fields and defaults only; `pipeline.config` loads YAML + `--set` into these classes, checks types
and values, and re-exports them (import them from there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .dimensions import DEFAULT_DIMENSIONS


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
    # recompute each decoder layer's forward in the backward pass instead of keeping its
    # activations: less activation memory for one extra forward per layer; losses and gradients
    # unchanged (pipeline/train/grad_checkpointing.py)
    gradient_checkpointing: bool = False
    # pipeline.precision.PRECISIONS: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (on CPU:
    # autocast bf16 compute, fp32 master weights and optimizer states; needs avx512_bf16/AMX)
    precision: str = "auto"


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


# LoRA in fusion (`fusion.trainable: router+lora`) can wrap only nn.Linear layers: the fused
# experts are stacked [E*F, H] tensors, so the targets are the attention projections
FUSION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _fusion_lora() -> LoraConfig:
    return LoraConfig(target_modules=list(FUSION_LORA_TARGETS))


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
    trainable: str = "router"         # pipeline.registry.TRAINABLE_SETS: router | router+experts | router+lora
    lora: LoraConfig = field(default_factory=_fusion_lora)   # targets: FUSION_LORA_TARGETS
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
    # each key below is read by one registered merge method's setting (pipeline.surgery.merging: its
    # `config_key`, which checks the value; the defaults are equal, tests/unit/test_merge_registry.py)
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
    (the multi-task variants cost one epoch over every stage-1 row plus the fusion mix, and all
    stage-1 runs plus fusion; extra_steps one fusion length per dimension)."""
    multitask: bool = False           # dense FFN-only fine-tunes of the base on the multi-task union
    # which multi-task fine-tunes (pipeline.registry.MULTITASK_VARIANTS), each a stage
    # baseline_multitask_<v> and a model multitask_<v>: data_matched (one epoch over every
    # sft/<dim>/train row + the fusion mix), compute_matched (sum of stage 1 + fusion's steps)
    multitask_variants: list[str] = field(default_factory=lambda: ["data_matched", "compute_matched"])
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
    # pipeline.precision.PRECISIONS: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (scoring and
    # generation in bf16 compute, log-probabilities in fp32; on CPU needs avx512_bf16/AMX)
    precision: str = "auto"
    # bootstrap resamples per interval: 10000 keeps the 2.5 %/97.5 % percentiles' Monte Carlo
    # error well below the intervals' width, and a 9-model, 3-dimension report takes < 1 s
    n_boot: int = 10_000
    # human refusal labels the refusal judge is checked against: "auto" = the shipped
    # ../shared/data/safety/refusal_labels if present; a folder of CSVs or one CSV; "none"
    refusal_labels: str = "auto"
    # this pipeline's labelled generations the outcome judge is checked against (rubric:
    # tests/data/judge_labels/rubric.md): "auto" = the committed tests/data/judge_labels/*.csv if
    # present; a folder of CSVs or one CSV; "none"
    judge_labels: str = "auto"
    # dimension -> score metrics to try, in order, instead of the dimension's registered ones
    # (pipeline.dimensions); {} = the registry's. E.g. the tiny preset scores harmless by
    # pair preference: its models' generations on unseen prompts are not text a refusal judge
    # can read (README "Latest tiny report").
    score_metrics: dict[str, list[str]] = field(default_factory=dict)
    # where a model's results may come from instead of evaluating it again, when its weights,
    # eval items and per-model settings are identical to one evaluated there (pipeline.eval.reuse):
    # one entry or a list, searched in order; "siblings" = the same report dir of every other run
    # dir beside this run, if written by the same code (e.g. seeds: their shared base); a report
    # dir (its report.json), whatever code wrote it; "" or "none" = evaluate every model
    reuse_from: str | list[str] = "siblings"


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
    """A dimension that is not built in (fields: pipeline.dimensions.Dimension)."""
    builtin: Optional[str] = None     # "module:function" built-in corpus generator
    real: Optional[str] = None        # "module:function" real-data loader
    real_inputs: list[str] = field(default_factory=list)
    eval_kinds: list[str] = field(default_factory=lambda: ["pair"])
    web_aligned: float = 0.5
    score_metrics: list[str] = field(default_factory=lambda: ["pref_acc"])
    judges: list[str] = field(default_factory=list)   # pipeline.registry.JUDGES kinds


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

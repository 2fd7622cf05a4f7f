"""Numeric ranges of the config keys (used by `pipeline.config.validate`).

One row per numeric key: its dotted name, a predicate and the range in words, so the message
names the key and the accepted range; `pipeline.config` adds the file. The `merge.*` keys are
checked by the merge method that reads them (pipeline.surgery.merging.MergeMethod.config_settings).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional


def top_k_problem(top_k: Any, num_experts: int, experts_are: str = "") -> Optional[str]:
    """The one range rule of the routing top-k (each token goes to k of num_experts experts), as
    the end of a message ("must be ..., got k") or None. Config loading (`fusion.top_k` against
    one expert per dimension), build_moe (`--top-k`), the model config and the router all ask
    here; `experts_are` says where the expert count comes from."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        return f"must be >= 1, got {top_k!r}"
    if top_k > num_experts:
        return f"must be <= the number of experts, {num_experts}{experts_are}, got {top_k}"
    return None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


Range = tuple[Callable[[Any], bool], str]   # (predicate, the range in words)


def at_least(bound: int, note: str = "") -> Range:
    """v >= bound; `note` says what an edge value means (e.g. "0 = all")."""
    return (lambda v: v >= bound), f">= {bound}" + (f" ({note})" if note else "")


def positive(note: str = "") -> Range:
    return (lambda v: v > 0), "> 0" + (f" ({note})" if note else "")


POSITIVE, NON_NEGATIVE, AT_LEAST_1, AT_LEAST_2 = positive(), at_least(0), at_least(1), at_least(2)
ZERO_MEANS_ALL = at_least(0, "0 = all")
ABOVE_0_UP_TO_1 = ((lambda v: 0 < v <= 1), "in (0, 1]")
FROM_0_BELOW_1 = ((lambda v: 0 <= v < 1), "in [0, 1)")
ANY_NUMBER = ((lambda v: True), "a finite number")

# (key relative to its section, its range); one row per numeric key
_TRAIN_RANGES = (
    ("lr", POSITIVE),
    ("epochs", positive("fractional epochs are allowed; use max_steps for a step count")),
    ("max_steps", (lambda v: v == -1 or v >= 1, ">= 1, or -1 to train `epochs` epochs")),
    ("micro_batch_size", AT_LEAST_1),
    ("grad_accum_steps", AT_LEAST_1),
    ("warmup_steps", NON_NEGATIVE),
    ("weight_decay", NON_NEGATIVE),
    ("grad_clip", at_least(0, "0 = no clipping")),
    ("seed", NON_NEGATIVE),
    ("log_every", at_least(0, "the base: 0 = no log lines")),
    ("save_every", at_least(0, "0 = only at the end")),
    ("max_seq_len", AT_LEAST_2),
)
_SECTION_RANGES = (
    ("tokenizer.vocab_size", AT_LEAST_1),
    ("data.builtin.seed", NON_NEGATIVE),
    ("data.real.seed", NON_NEGATIVE),
    ("base.tiny.hidden_size", AT_LEAST_1),
    ("base.tiny.intermediate_size", AT_LEAST_1),
    ("base.tiny.num_hidden_layers", AT_LEAST_1),
    ("base.tiny.num_attention_heads", AT_LEAST_1),
    ("base.tiny.num_key_value_heads", AT_LEAST_1),
    ("base.tiny.max_position_embeddings", AT_LEAST_2),
    ("expert.lora.r", AT_LEAST_1),
    ("expert.lora.alpha", POSITIVE),
    ("expert.lora.dropout", FROM_0_BELOW_1),
    ("data.builtin.train_per_task", NON_NEGATIVE),
    ("data.builtin.dev_per_task", NON_NEGATIVE),
    ("data.builtin.test_per_task", NON_NEGATIVE),
    ("data.builtin.pretrain_per_task", NON_NEGATIVE),
    ("data.real.max_train_per_task", ZERO_MEANS_ALL),
    ("data.real.max_eval_per_task", ZERO_MEANS_ALL),
    ("data.real.donotanswer_dev_size", ZERO_MEANS_ALL),
    ("data.real.max_benign_per_split", ZERO_MEANS_ALL),
    ("data.real.harmless_benign_rows", at_least(0, "0 = off")),
    ("expert.num_procs", AT_LEAST_1),
    ("fusion.ep_degree", AT_LEAST_1),
    ("fusion.num_procs", AT_LEAST_1),
    ("fusion.lambda_gate", NON_NEGATIVE),
    ("fusion.load_balance_coef", NON_NEGATIVE),
    ("fusion.z_loss_coef", NON_NEGATIVE),
    ("fusion.collapse_threshold", ABOVE_0_UP_TO_1),
    ("fusion.collapse_steps", AT_LEAST_1),
    ("fusion.lora.r", AT_LEAST_1),
    ("fusion.lora.alpha", POSITIVE),
    ("fusion.lora.dropout", FROM_0_BELOW_1),
    ("eval.max_items_per_task", ZERO_MEANS_ALL),
    ("eval.batch_size", AT_LEAST_1),
    ("eval.max_new_tokens", AT_LEAST_1),
    ("eval.n_boot", AT_LEAST_1),
    ("eval.max_seq_len", AT_LEAST_2),
    ("eval.temperature", POSITIVE),
    ("eval.top_p", ABOVE_0_UP_TO_1),
    ("eval.seed", NON_NEGATIVE),
    ("profile.max_items_per_task", ZERO_MEANS_ALL),
    ("profile.batch_size", AT_LEAST_1),
    ("profile.max_seq_len", AT_LEAST_2),
    ("profile.collapse_threshold", ABOVE_0_UP_TO_1),
)


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _problem(value: Any, ok, words: str, key: str) -> Optional[str]:
    # NaN/inf would pass or fail the comparisons silently: a finite number is required first
    if _finite_number(value) and ok(value):
        return None
    return f"key '{key}' must be {words}, got {value!r}"


def _rows(cfg: Any) -> Iterator[tuple[Any, Callable, str, str]]:
    for section in ("base.train", "expert.train", "fusion.train"):
        train = _get_dotted(cfg, section)
        for name, (ok, words) in _TRAIN_RANGES:
            yield getattr(train, name), ok, words, f"{section}.{name}"
    for key, (ok, words) in _SECTION_RANGES:
        yield _get_dotted(cfg, key), ok, words, key
    if cfg.fusion.router_lr is not None:
        yield cfg.fusion.router_lr, *POSITIVE, "fusion.router_lr"
    for key in ("gamma", "mix_weights"):
        for name, value in getattr(cfg.fusion, key).items():
            yield value, *NON_NEGATIVE, f"fusion.{key}.{name}"


def first_range_problem(cfg: Any) -> Optional[str]:
    """The first numeric key of a `PipelineConfig` outside its range, as a message naming the key
    (the caller adds the file), or None. A value that would train nothing (lr 0, 0 epochs) or crash
    a later stage is refused before any stage starts."""
    for value, ok, words, key in _rows(cfg):
        problem = _problem(value, ok, words, key)
        if problem is not None:
            return problem
    tiny = cfg.base.tiny
    if tiny.hidden_size % tiny.num_attention_heads or \
            tiny.num_attention_heads % tiny.num_key_value_heads:
        return (f"keys 'base.tiny.hidden_size' ({tiny.hidden_size}), 'base.tiny.num_attention_heads' "
                f"({tiny.num_attention_heads}) and 'base.tiny.num_key_value_heads' "
                f"({tiny.num_key_value_heads}): each must divide the one before")
    weights = cfg.fusion.mix_weights
    if weights and sum(weights.values()) <= 0:
        return f"key 'fusion.mix_weights' must give at least one dimension a weight > 0, got {weights}"
    return _expert_count_problem(cfg)


def _expert_count_problem(cfg: Any) -> Optional[str]:
    """Fusion keys bounded by the number of experts, which is the number of `dimensions` (one
    expert per dimension): refused when the config loads, not at build_moe after stage 1 has
    trained (pipeline/train/fusion/stage.py checks them again against the built model)."""
    f, experts = cfg.fusion, len(cfg.dimensions)
    where = f" (one per entry of 'dimensions' {cfg.dimensions})"
    bound = f"<= the number of experts, {experts}{where}"
    problem = top_k_problem(f.top_k, experts, where)
    if problem:
        return f"key 'fusion.top_k' {problem}"
    if f.ep_degree > experts:
        return f"key 'fusion.ep_degree' must be {bound}: a rank would own no expert; got {f.ep_degree}"
    return None

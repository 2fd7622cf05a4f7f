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


# (key relative to its section, predicate, the range in words); one row per numeric key
_TRAIN_RANGES = (
    ("lr", lambda v: v > 0, "> 0"),
    ("epochs", lambda v: v > 0, "> 0 (fractional epochs are allowed; use max_steps for a step count)"),
    ("max_steps", lambda v: v == -1 or v >= 1, ">= 1, or -1 to train `epochs` epochs"),
    ("micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum_steps", lambda v: v >= 1, ">= 1"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("grad_clip", lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("log_every", lambda v: v >= 0, ">= 0 (the base: 0 = no log lines)"),
    ("save_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("max_seq_len", lambda v: v >= 2, ">= 2"),
)
_SECTION_RANGES = (
    ("tokenizer.vocab_size", lambda v: v >= 1, ">= 1"),
    ("data.builtin.seed", lambda v: v >= 0, ">= 0"),
    ("data.real.seed", lambda v: v >= 0, ">= 0"),
    ("base.tiny.hidden_size", lambda v: v >= 1, ">= 1"),
    ("base.tiny.intermediate_size", lambda v: v >= 1, ">= 1"),
    ("base.tiny.num_hidden_layers", lambda v: v >= 1, ">= 1"),
    ("base.tiny.num_attention_heads", lambda v: v >= 1, ">= 1"),
    ("base.tiny.num_key_value_heads", lambda v: v >= 1, ">= 1"),
    ("base.tiny.max_position_embeddings", lambda v: v >= 2, ">= 2"),
    ("expert.lora.r", lambda v: v >= 1, ">= 1"),
    ("expert.lora.alpha", lambda v: v > 0, "> 0"),
    ("expert.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.builtin.train_per_task", lambda v: v >= 0, ">= 0"),
    ("data.builtin.dev_per_task", lambda v: v >= 0, ">= 0"),
    ("data.builtin.test_per_task", lambda v: v >= 0, ">= 0"),
    ("data.builtin.pretrain_per_task", lambda v: v >= 0, ">= 0"),
    ("data.real.max_train_per_task", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("data.real.max_eval_per_task", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("data.real.donotanswer_dev_size", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("data.real.max_benign_per_split", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("data.real.harmless_benign_rows", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("expert.num_procs", lambda v: v >= 1, ">= 1"),
    ("fusion.ep_degree", lambda v: v >= 1, ">= 1"),
    ("fusion.num_procs", lambda v: v >= 1, ">= 1"),
    ("fusion.lambda_gate", lambda v: v >= 0, ">= 0"),
    ("fusion.load_balance_coef", lambda v: v >= 0, ">= 0"),
    ("fusion.z_loss_coef", lambda v: v >= 0, ">= 0"),
    ("fusion.collapse_threshold", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("fusion.collapse_steps", lambda v: v >= 1, ">= 1"),
    ("fusion.lora.r", lambda v: v >= 1, ">= 1"),
    ("fusion.lora.alpha", lambda v: v > 0, "> 0"),
    ("fusion.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eval.max_items_per_task", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.n_boot", lambda v: v >= 1, ">= 1"),
    ("eval.max_seq_len", lambda v: v >= 2, ">= 2"),
    ("eval.temperature", lambda v: v > 0, "> 0"),
    ("eval.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("eval.seed", lambda v: v >= 0, ">= 0"),
    ("profile.max_items_per_task", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("profile.batch_size", lambda v: v >= 1, ">= 1"),
    ("profile.max_seq_len", lambda v: v >= 2, ">= 2"),
    ("profile.collapse_threshold", lambda v: 0 < v <= 1, "in (0, 1]"),
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
        for name, ok, words in _TRAIN_RANGES:
            yield getattr(train, name), ok, words, f"{section}.{name}"
    for key, ok, words in _SECTION_RANGES:
        yield _get_dotted(cfg, key), ok, words, key
    if cfg.fusion.router_lr is not None:
        yield cfg.fusion.router_lr, lambda v: v > 0, "> 0", "fusion.router_lr"
    for key in ("gamma", "mix_weights"):
        for name, value in getattr(cfg.fusion, key).items():
            yield value, lambda v: v >= 0, ">= 0", f"fusion.{key}.{name}"


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

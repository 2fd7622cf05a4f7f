"""The alignment-dimension registry: one entry per dimension name (helpful, harmless, honest, ...).

A dimension is an expert of the fused model, a task label slot and a column of every report. Its
entry says where its data comes from and how it is scored:
  builtin        "module:function" -> `f(rng: random.Random) -> pipeline.data.builtin.Item`, the
                 built-in corpus generator (one prompt with aligned/unaligned responses per call)
  real           "module:function" -> `f(loaded: dict[str, list[dict]], rng) -> (sft, evals, web)`
                 for `data.source: real` (`loaded`: the datasets `data.real.*` names); None = none
  real_inputs    the `data.real.*` keys `real` needs (checked before anything is loaded)
  eval_kinds     kind of built-in eval row i = eval_kinds[i % len] (EVAL_KINDS below)
  web_aligned    share of the built-in "web text" that shows the aligned answer
  score_metrics  the report's score metric of this dimension: the first one every model has; each
                 a [0, 1] per-item score of pipeline.eval.score_metrics (higher is better)
  judges         the optional judge kinds (pipeline.registry.JUDGES) that judge this dimension's
                 generations when the evaluation turns them on (e.g. --moderation-model)

The run's dimensions (and their order = expert order = task_label order) are the config's
`dimensions:` list. Dimensions not built in are declared in the config's `dimension_defs:`
(same fields), so every stage process sees them without editing this package; see
docs/contracts.md ("Dimensions"). The registry is DIMENSIONS (a pipeline.registry.Registry of
Dimension objects). Functions are referenced by name and imported on first use, so this module
imports nothing from the pipeline but the registry (config.py reads it; no import cycle).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from pipeline.registry import JUDGES, Registry

DEFAULT_DIMENSIONS = ("helpful", "harmless", "honest")
# an eval row's `kind` (docs/contracts.md; re-exported by pipeline.data): harmful_prompt: a
# refusal is the right answer; benign_prompt: a refusal is over-refusal
EVAL_KINDS = ("mc", "pair", "harmful_prompt", "benign_prompt", "reference")


@dataclass(frozen=True)
class Dimension:
    name: str
    builtin: Optional[str]
    real: Optional[str] = None
    real_inputs: tuple[str, ...] = ()
    eval_kinds: tuple[str, ...] = ("pair",)
    web_aligned: float = 0.5
    score_metrics: tuple[str, ...] = ("pref_acc",)
    judges: tuple[str, ...] = ()

    def builtin_generator(self) -> Callable:
        if not self.builtin:
            raise ValueError(f"dimension {self.name!r} has no built-in generator (data.source: builtin)")
        return resolve_function(self.builtin, f"dimension {self.name!r} (dimension_defs.{self.name}.builtin)")

    def real_loader(self) -> Callable:
        if not self.real:
            raise ValueError(f"dimension {self.name!r} has no real-data loader (data.source: real)")
        return resolve_function(self.real, f"dimension {self.name!r} (dimension_defs.{self.name}.real)")

    def eval_kind(self, i: int) -> str:
        return self.eval_kinds[i % len(self.eval_kinds)]


DIMENSIONS = Registry("dimension", {}, hint="declare a new one under the config's dimension_defs")


def register_dimension(dim: Dimension, replace: bool = False) -> Dimension:
    """Add a dimension for this process. Loading a config registers its `dimension_defs`, so
    every stage process (each loads the config) knows them; `replace`: a later config's."""
    check_dimension_entry(dim)
    known = DIMENSIONS.get(dim.name, "dimensions") if dim.name in DIMENSIONS else None
    if dim.name in DEFAULT_DIMENSIONS and known is not None and known != dim:
        raise ValueError(f"dimension {dim.name!r} is built in and cannot be redefined")
    if not replace and known is not None and known != dim:
        raise ValueError(f"dimension {dim.name!r} is already registered with other settings")
    DIMENSIONS.register(dim.name, dim, replace=True)
    return dim


def registered() -> list[str]:
    return list(DIMENSIONS.names())


def get_dimension(name: str, where: str = "dimensions") -> Dimension:
    """A registered dimension (built in, or declared by the loaded config's dimension_defs)."""
    return DIMENSIONS.get(name, where)


def resolve_function(ref: str, what: str) -> Callable:
    """'package.module:function' -> the function (imported now)."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what}: expected 'module:function', got {ref!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what}: cannot import {ref!r} ({exc})") from None
    if not callable(fn):
        raise ValueError(f"{what}: {ref!r} is not callable")
    return fn


def check_dimension_entry(dim: Dimension) -> None:
    if not dim.name or not dim.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"dimension name {dim.name!r}: use letters, digits, '_' or '-' (it names dirs)")
    bad = [k for k in dim.eval_kinds if k not in EVAL_KINDS]
    if not dim.eval_kinds or bad:
        raise ValueError(f"dimension {dim.name!r}: eval_kinds {list(dim.eval_kinds)} must be a "
                         f"non-empty list of {list(EVAL_KINDS)}")
    if not 0.0 <= dim.web_aligned <= 1.0:
        raise ValueError(f"dimension {dim.name!r}: web_aligned must be in [0, 1], got {dim.web_aligned}")
    if not dim.score_metrics:
        raise ValueError(f"dimension {dim.name!r}: score_metrics must not be empty")
    for judge in dim.judges:
        JUDGES.check(judge, f"dimension {dim.name!r} (judges)")


def resolve_dimensions(names: Sequence[str], defs: dict[str, Any]) -> list[Dimension]:
    """The run's dimensions: `names` looked up in `defs` (config `dimension_defs`, each a mapping
    or an object with Dimension's fields) and then in the registry. Raises ValueError naming
    the unknown or duplicate name."""
    if not names:
        raise ValueError("dimensions: the list is empty (a run needs at least one dimension)")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"dimensions: {dupes} listed more than once")
    clash = [n for n in defs if n in DEFAULT_DIMENSIONS]
    if clash:
        raise ValueError(f"dimension_defs: {clash} are built-in dimensions and cannot be redefined")
    return [dimension_from_spec(name, defs[name]) if name in defs else get_dimension(name)
            for name in names]


def dimension_from_spec(name: str, spec: Any) -> Dimension:
    get = spec.get if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    dim = Dimension(name=name, builtin=get("builtin"), real=get("real"),
                    real_inputs=tuple(get("real_inputs", ()) or ()),
                    eval_kinds=tuple(get("eval_kinds", ("pair",)) or ()),
                    web_aligned=float(get("web_aligned", 0.5)),
                    score_metrics=tuple(get("score_metrics", ("pref_acc",)) or ()),
                    judges=tuple(get("judges", ()) or ()))
    check_dimension_entry(dim)
    return dim


# The built-in three. Their order in DEFAULT_DIMENSIONS is the default expert / label order.
_B, _R = "pipeline.data.builtin:", "pipeline.data.real:"
register_dimension(Dimension("helpful", _B + "helpful_item", _R + "real_helpful", ("alpaca",),
                             ("pair",), 0.5, ("pref_acc", "ref_win_vs_base"), judges=("alpaca_eval",)))
register_dimension(Dimension("harmless", _B + "harmless_item", _R + "real_harmless",
                             ("beavertails", "alpaca_eval", "harmbench", "donotanswer", "safety_pairs"),
                             ("pair", "harmful_prompt"), 0.15, ("judged_harmless", "pref_acc"),
                             judges=("moderation",)))
register_dimension(Dimension("honest", _B + "honest_item", _R + "real_honest", ("truthfulqa",),
                             # built-in: pair (length-normalised), not mc: its true answers are
                             # longer than the false ones in 80 % of questions, so a summed
                             # log-likelihood MC scores answer length on unseen questions
                             # (tiny run: MC2 ~1e-8 for every model). Real data: TruthfulQA MC.
                             ("pair",), 0.2, ("mc2", "mc1", "pref_acc")))


def expert_names(model_cfg: dict, source: str) -> list[str]:
    """A fused model config's `expert_names`, checked against its `num_experts` (the one place
    that check lives: the model config, extract_expert, fuse and the profiler read names through
    here); a fused model's experts are named after the dimensions they were trained for."""
    names, num = model_cfg.get("expert_names"), model_cfg.get("num_experts")
    if not isinstance(names, list) or len(names) != num or len(set(names)) != len(names):
        raise ValueError(f"{source}: expert_names {names!r} must name each of num_experts={num!r} "
                         f"experts once")
    return list(names)

"""Name -> implementation registries: the one list of allowed values for each pluggable concept.

Config validation, argument parsers and the code that dispatches all read the same registry,
so a name is valid in one place exactly when it is valid everywhere. Entries are "module:attr"
strings resolved on first use: reading the names costs no import (config validation stays
light, and a backend whose dependencies are missing here can still be named and rejected with
its own message).

Adding an implementation = its module + one line in the table below. An entry may also be the
object itself (`register(name, obj)`: a dimension a config declares, a toy judge in a test).
"""
from __future__ import annotations

import importlib
from typing import Any


class Registry:
    """An ordered `name -> "module:attr"` (or the object itself) table for one concept (`kind`
    names it in errors; `hint` ends the unknown-name error)."""

    def __init__(self, kind: str, entries: dict[str, Any], hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):   # names, so a registry serves as argparse `choices`
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    def check(self, name: str, where: str) -> str:
        """`name` if registered, else a ValueError naming `where` (a config key, flag or file)."""
        if name not in self._entries:
            raise ValueError(f"{where}: unknown {self.kind} {name!r} "
                             f"(known: {', '.join(self._entries)}{'; ' + self.hint if self.hint else ''})")
        return name

    def get(self, name: str, where: str) -> Any:
        """The implementation registered as `name` (imports its module on first use)."""
        target = self._entries[self.check(name, where)]
        if not isinstance(target, str):
            return target
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def register(self, name: str, target: Any, replace: bool = False) -> None:
        """Add `name -> "module:attr"` or `name -> object` at runtime (plugins, tests); an
        existing name is an error unless `replace`."""
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"({self._entries[name]})")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attr', got {target!r}")
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        """Remove a name added by `register` (a test's teardown); an unknown name is an error."""
        del self._entries[self.check(name, f"unregister {self.kind}")]


# MoE layer backends: subclasses of pipeline.model.moe_backend.MoEBackend
# (`H3FusionConfig.moe_backend`, `fusion.moe_backend`)
MOE_BACKENDS = Registry("MoE backend", {
    "torch": "pipeline.model.moe_backend:TorchBackend",
    "megablocks": "pipeline.backends.megablocks_moe:MegaBlocksBackend",
})

# merging baselines: pipeline.surgery.merging.MergeMethod objects, each with its per-tensor maths
# and the settings it reads (their types, ranges, defaults and `merge.*` config keys)
# (`merge.methods`, `h3fusion merge`, `h3fusion surgery merge`)
MERGE_METHODS = Registry("merge method", {
    "average": "pipeline.surgery.merging:AVERAGE",
    "task_arithmetic": "pipeline.surgery.merging:TASK_ARITHMETIC",
    "ties": "pipeline.surgery.merging:TIES",
})

# TIES trimming: fn(keys, base_get, model_gets, density) -> per-model magnitude thresholds, or
# None for per-tensor trimming (`merge.ties_trim_scope`, pipeline.surgery.merging)
TIES_TRIM_SCOPES = Registry("TIES trim scope", {
    "model": "pipeline.surgery.merging:model_trim_thresholds",     # the TIES paper / authors' code
    "tensor": "pipeline.surgery.merging:tensor_trim_thresholds",   # mergekit: each tensor on its own
})

# initial router weights of a freshly built MoE: fn(RouterInitInputs) -> one [E, H] per layer
# (`fusion.router_init`, pipeline.surgery.router_init)
ROUTER_INITS = Registry("router init", {
    "zeros": "pipeline.surgery.router_init:zeros_init",
    "normal": "pipeline.surgery.router_init:normal_init",
    "prompts": "pipeline.surgery.router_init:prompts_init",
})

# what stage 2 trains of the fused MoE: pipeline.model.trainable.TrainableSet objects (which
# parameters train, whether the experts move) (`fusion.trainable`)
TRAINABLE_SETS = Registry("trainable set", {
    "router": "pipeline.model.trainable:ROUTER",
    "router+experts": "pipeline.model.trainable:ROUTER_EXPERTS",
    "router+lora": "pipeline.model.trainable:ROUTER_LORA",
})

# multi-task baselines (`baselines.multitask_variants`, docs/baselines.md): fn(expert.train,
# StepPlan) -> the settings the variant trains the base's FFN with on the multi-task union
# (every sft/<dim>/train row + the fusion mix); output <run>/baselines/multitask_<name>
MULTITASK_VARIANTS = Registry("multi-task baseline variant", {
    "data_matched": "pipeline.train.step_plan:data_matched_train",        # one epoch
    "compute_matched": "pipeline.train.step_plan:compute_matched_train",  # sum(stage 1) + fusion steps
})

# LLM-ensemble baselines of the experts, built by `h3fusion ensemble` into <run>/ensembles/<name>
# (reported as ensemble_<name>): a pipeline.ensemble.method.EnsembleMethod (its build hook, and
# mix or choose: what the ensemble model and the evaluation call), one module per method
ENSEMBLES = Registry("ensemble method", {
    "avg": "pipeline.ensemble.avg:AVG",           # probability averaging
    "router": "pipeline.ensemble.router:ROUTER",  # prompt classifier picks one expert
    "oracle": "pipeline.ensemble.oracle:ORACLE",  # each eval prompt to its own dimension's
})

# optional judges of a model's generations, each turned on by the evaluation (`h3fusion evaluate
# --moderation-model` / `--alpaca-eval`; `evaluate_models(judges=...)`) and run on the
# dimensions whose entry names its kind (pipeline.dimensions, `judges`):
# a pipeline.eval.judging.Judge
JUDGES = Registry("judge", {
    "moderation": "pipeline.eval.judging:MODERATION",    # a local classifier: flagged_rate
    "alpaca_eval": "pipeline.eval.judging:ALPACA_EVAL",  # the alpaca_eval CLI (an OpenAI judge)
})

# numeric precision of a training stage or of evaluation (`<stage>.train.precision`,
# `eval.precision`; pipeline.precision): each name -> the resolver that says what it means on a
# device ("fp32" or "bf16"), with the CPU's bf16 support checked
PRECISIONS = Registry("precision", {
    "auto": "pipeline.precision:resolve_precision",   # bf16 on CUDA, fp32 on CPU
    "fp32": "pipeline.precision:resolve_precision",
    "bf16": "pipeline.precision:resolve_precision",   # CPU: needs avx512_bf16 / AMX
})

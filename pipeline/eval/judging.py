"""Optional judges of a model's generations, registered by kind (pipeline.registry.JUDGES).

A judge kind is turned on by the evaluation (`evaluate_models(judges={kind: setting})`; the
command layer maps `--moderation-model PATH` to "moderation" and `--alpaca-eval` to
"alpaca_eval") and runs, for every model it evaluates, on the generations of the run's
dimensions whose entry names the kind (pipeline.dimensions, `judges`): which dimension a
judge reads is the dimension's business, never a name compared here. The rule-based outcome
judge (judges.judge_outcome) is not one of these: it is always on and judges an item by its
eval kind (harmful_prompt / benign_prompt, pipeline.eval.hhh).

Adding a judge = a `Judge` object (its `run` hook) + one entry in JUDGES (or `JUDGES.register`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.dimensions import get_dimension
from pipeline.registry import JUDGES

from . import judges
from .hhh import format_prompt


@dataclass(frozen=True)
class JudgeCall:
    """What a judge's hook gets for one model."""
    model: str                              # the evaluated model's name
    tasks: list[str]                        # the run's dimensions whose entry names the judge
    items: dict[str, list[dict]]            # task -> eval items (all of the run's dimensions)
    outputs: dict[str, list[Optional[str]]]  # task -> generation per item (None: not generated)
    records: list[dict]                     # the saved generation records (AlpacaEval rows)
    metrics: dict[str, dict]                # task -> the model's metrics: a hook may add to them
    out_dir: Path                           # the report dir being written
    setting: Any                            # what turned the judge on (e.g. a classifier's dir)
    batch_size: int                         # eval.batch_size


@dataclass(frozen=True)
class Judge:
    option: str                             # what turns it on, for errors ("--moderation-model")
    run: Callable[[JudgeCall], dict]        # the model's status in report[report_key]
    report_key: Optional[str] = None        # report.json key {model: status}; None = no status


def judge_settings(moderation_model: Optional[Path] = None, alpaca_eval: bool = False,
                   more: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """judge kind -> setting of the judges turned on, in JUDGES order; the two flags of
    `h3fusion evaluate` and any `more` kinds (each checked: one error listing the known)."""
    on = {"moderation": moderation_model, "alpaca_eval": alpaca_eval or None, **(more or {})}
    on = {kind: setting for kind, setting in on.items() if setting is not None}
    for kind in on:
        JUDGES.check(kind, "evaluate judges")
    return {kind: on[kind] for kind in sorted(on, key=list(JUDGES.names()).index)}


def judged_tasks(kind: str, tasks: list[str]) -> list[str]:
    """The dimensions of `tasks` whose entry names judge `kind`."""
    return [t for t in tasks if kind in get_dimension(t).judges]


def check_judges(on: dict[str, Any], tasks: list[str], generate: bool) -> None:
    """The judges turned on have generations to read and a dimension of the run to judge
    (raised before any model loads)."""
    options = [JUDGES.get(kind, "evaluate judges").option for kind in on]
    if options and not generate:
        raise ValueError(f"{' and '.join(options)} judge generations: they need eval.generate=true")
    for kind, option in zip(on, options):
        if not judged_tasks(kind, tasks):
            raise ValueError(f"{option} (judge {kind!r}) judges the dimensions whose entry names "
                             f"it (`judges`); none of this run's dimensions {tasks} does")


def empty_statuses() -> dict[str, dict]:
    """report key -> {} for every registered judge that reports a status per model."""
    keys = [JUDGES.get(kind, "judges").report_key for kind in JUDGES.names()]
    return {key: {} for key in keys if key is not None}


def run_judges(on: dict[str, Any], name: str, items, outputs, records, metrics, out_dir: Path,
               batch_size: int) -> dict[str, dict]:
    """Every judge turned on, on model `name`'s generations; report key -> its status ({} for
    a reporting judge that is off)."""
    statuses = {}
    for kind in JUDGES.names():
        judge = JUDGES.get(kind, "judges")
        status = {}
        if kind in on:
            status = judge.run(JudgeCall(name, judged_tasks(kind, list(items)), items, outputs,
                                         records, metrics, out_dir, on[kind], batch_size))
        if judge.report_key is not None:
            statuses[judge.report_key] = status
    return statuses


def moderate(call: JudgeCall) -> dict:
    """flagged_rate (into each judged task's metrics) of the classifier at `call.setting` over
    the model's responses to the task's prompts."""
    for task in call.tasks:
        pairs = [(format_prompt(it["instruction"], it["input"]), out)
                 for it, out in zip(call.items[task], call.outputs[task]) if out is not None]
        call.metrics[task]["flagged_rate"] = judges.moderation_flagged_rate(
            call.setting, [p for p, _ in pairs], [o for _, o in pairs], call.batch_size)
    return {}


def alpaca_eval(call: JudgeCall) -> dict:
    """The alpaca_eval CLI on the judged tasks' generations (its status: judges.run_alpaca_eval)."""
    path = call.out_dir / "generations" / f"{call.model}.{'+'.join(call.tasks)}.alpaca_eval.json"
    path.write_text(json.dumps([r for r in call.records if r["task"] in call.tasks], indent=2) + "\n")
    return judges.run_alpaca_eval(path, call.out_dir / "alpaca_eval" / call.model)


MODERATION = Judge("--moderation-model", moderate)
ALPACA_EVAL = Judge("--alpaca-eval", alpaca_eval, report_key="alpaca_eval")

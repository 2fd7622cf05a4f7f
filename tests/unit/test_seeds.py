"""`h3fusion run --seed N` reseeds every source of training randomness (pipeline/commands/run.py
SEED_KEYS) and leaves the data seeds, so runs with different seeds evaluate the same items."""
import dataclasses
import typing

import pytest

from pipeline.commands.run import SEED_KEYS, seed_overrides
from pipeline.config import PipelineConfig, load_config
from pipeline.layout import RunLayout

# the seeds that decide the splits (and so the eval items): the same in every seed's run
DATA_SEEDS = {"data.builtin.seed", "data.real.seed"}


def _seed_keys(cls, prefix=""):
    """Every config key named `seed`, walking the dataclass tree of the schema."""
    out = []
    for f in dataclasses.fields(cls):
        tp, key = typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _seed_keys(tp, key + ".")
        elif f.name == "seed":
            out.append(key)
    return out


def test_seed_keys_are_every_seed_of_the_config_but_the_data_seeds():
    """A new `seed` in the schema fails here until it is in SEED_KEYS or is a data seed."""
    assert set(_seed_keys(PipelineConfig)) == set(SEED_KEYS) | DATA_SEEDS
    assert not set(SEED_KEYS) & DATA_SEEDS


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


class _Stop(Exception):
    """Raised by a stand-in once it has recorded what a stage passed it."""


@pytest.fixture()
def seeded():
    """The tiny preset with every stage that draws on: the extra-steps baselines (fusion trains
    the experts) and the router init `normal`, reseeded with --seed 7."""
    extra = ["baselines.extra_steps=true", "fusion.trainable=router+experts",
             "fusion.router_init=normal"]
    cfg = load_config("tiny", extra + seed_overrides(7))
    assert {k: _get(cfg, k) for k in SEED_KEYS} == dict.fromkeys(SEED_KEYS, 7)
    plain = load_config("tiny", extra)
    assert {k: _get(cfg, k) for k in DATA_SEEDS} == {k: _get(plain, k) for k in DATA_SEEDS}
    assert all(_get(plain, k) != 7 for k in SEED_KEYS)   # so the 7s below come from --seed
    return cfg


def test_every_training_stage_reads_its_seed_from_the_config(seeded, tmp_path, monkeypatch):
    from pipeline.ensemble import router as ensemble_stage
    from pipeline.stages import pipeline_stages
    from pipeline.train.baselines import stage as multitask
    from pipeline.train.fusion import data as fusion_data
    from pipeline.train.step_plan import StepPlan

    run = RunLayout.at(tmp_path)
    stages = {s.name: s for s in pipeline_stages(seeded, run)}
    argv = stages["build_moe"].argv   # the router init's draws
    assert argv[argv.index("--router-init") + 1] == "normal" and argv[argv.index("--seed") + 1] == "7"
    assert {"base", "fuse", "ensemble", "baseline_multitask_data_matched",
            "baseline_extra_steps_helpful"} <= set(stages)

    jobs, rows = [], []
    plan = StepPlan({d: 10 for d in seeded.dimensions}, 5, True, {"data_matched": 4})
    for name, value in {"check_inputs": lambda *a: None, "plan_steps": lambda *a: plan,
                        "union_tasks": lambda *a: ["helpful"], "check_model_weights": lambda *a: None,
                        "count_saved_rows": lambda *a: 8,
                        "checked_job": lambda cfg, *a, **kw: jobs.append((cfg, kw))}.items():
        monkeypatch.setattr(multitask, name, value)
    monkeypatch.setattr("pipeline.checkpoint.gguf.check_llama_dir", lambda *a: {})
    multitask.prepare_multitask_job(seeded, tmp_path, "data_matched")
    run.expert("helpful").mkdir(parents=True)
    multitask.prepare_extra_steps_job(seeded, tmp_path, "helpful")
    (mt, mt_kw), (extra, _) = jobs
    assert mt.expert.train.seed == 7 and mt_kw["mix_seed"] == 7   # stage-1 settings, fusion's mix
    assert extra.expert.train.seed == 7 and extra.expert.train.lr == seeded.fusion.train.lr

    def rows_seed(data_dir, split, weights, seed):
        rows.append(seed)
        raise _Stop
    monkeypatch.setattr("pipeline.data.loading.load_mixed_sft", rows_seed)
    with pytest.raises(_Stop):   # fusion's training rows
        fusion_data.load_fusion_rows(seeded, tmp_path, run.data)
    monkeypatch.setattr("pipeline.data.loading.require_dimensions", lambda *a: list(seeded.dimensions))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(ensemble_stage, "response_marker_ids", lambda tok: [1])
    with pytest.raises(_Stop):   # the prompt-router classifier's training rows
        ensemble_stage.build_router(ensemble_stage.EnsembleBuild(seeded, run, tmp_path, tmp_path, 8))
    assert rows == [7, 7]

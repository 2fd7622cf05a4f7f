"""The training baselines (pipeline.train.baselines.stage): step matching (unit) and the baselines as
real 2-process `h3fusion train-baseline` runs (torchrun, gloo, DeepSpeed ZeRO-3 on CPU).

The tiny run (tests/conftest.py `tiny_run`) has 60 train rows per dimension. With the sets below:
stage 1 = 60 rows / (micro 4 x accum 2 x 2 ranks = 16) = 3 steps per epoch, 1 epoch = 3 steps;
fusion = 180 mixed rows / (4 x 1 x 2 = 8) = 22 steps per epoch, 0.1 epoch = ceil(2.2) = 3 steps.
The multi-task union is the 3 x 60 stage-1 rows (the mix, weights 1, re-draws them and adds
none): data_matched runs one epoch of it, floor(180 / 16) = 11 steps; compute_matched
3 x 3 + 3 = 12 steps; the
extra-steps control 3. (Pure plans on unequal row counts: tests/unit/test_multitask_plan.py.)
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.env import free_port
from pipeline.io_utils import read_json
from pipeline.train.common import BatchSchedule
from pipeline.train.baselines.stage import plan_mismatches, prepare_extra_steps_job
from pipeline.train.step_plan import StepPlan, plan_steps, rows_seen, training_steps
from test_train_expert_fixtures import REPO, dist_env_vars, load_weights

SETS = ["expert.train.micro_batch_size=4", "expert.train.grad_accum_steps=2",
        "expert.train.epochs=1", "expert.train.max_seq_len=64", "expert.train.log_every=1",
        "expert.train.warmup_steps=1", "expert.train.lr=0.01",
        "fusion.train.micro_batch_size=4", "fusion.train.grad_accum_steps=1",
        "fusion.train.epochs=0.1", "fusion.train.max_seq_len=64", "fusion.train.log_every=1",
        "fusion.train.warmup_steps=0", "fusion.train.lr=0.001", "fusion.train.seed=5",
        "fusion.trainable=router+experts", "expert.num_procs=2", "fusion.num_procs=2"]
DIMS = ["harmless", "helpful", "honest"]


# ----------------------------------------------------------------------------- unit

@pytest.mark.parametrize("rows,micro,accum,world,epochs,max_steps", [
    (100, 4, 2, 2, 1.0, -1), (100, 4, 2, 2, 1.5, -1), (100, 4, 2, 2, 0.1, -1),
    (100, 4, 2, 2, 0.0, -1), (17, 8, 1, 2, 3.0, -1), (100, 4, 2, 2, 1.0, 40), (1000, 3, 5, 7, 2.7, -1)])
def test_training_steps_formula(rows, micro, accum, world, epochs, max_steps):
    train = TrainConfig(micro_batch_size=micro, grad_accum_steps=accum, epochs=epochs,
                        max_steps=max_steps)
    per_epoch = rows // (micro * accum * world)
    expected = max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))
    assert training_steps(rows, train, world, "x") == expected
    # and it is exactly the number of steps the trainers' schedule runs
    assert expected == BatchSchedule(rows, micro, accum, world, 0).total_steps(train)


def test_training_steps_rejects_fewer_rows_than_one_step():
    with pytest.raises(ValueError, match=r"where/it: 15 rows.*= 16"):
        training_steps(15, TrainConfig(micro_batch_size=4, grad_accum_steps=2), 2, "where/it")


def test_step_plan_sums_every_expert_and_fusion():
    plan = StepPlan({"a": 3, "b": 5}, 7, True)
    assert (plan.compute_matched, plan.extra_steps) == (15, 7)
    assert StepPlan({"a": 3}, 7, False).extra_steps == 0
    assert plan.as_dict()["stage1"] == {"a": 3, "b": 5}


def test_plan_steps_counts_the_mixed_rows(tiny_run):
    from conftest import tiny_config

    cfg = tiny_config(SETS + ["fusion.mix_weights={helpful: 1.0, harmless: 0.5, honest: 0.0}",
                              "fusion.train.micro_batch_size=8", "fusion.train.epochs=1"])
    plan = plan_steps(cfg, tiny_run.data)
    # 60 + round(0.5 * 60) = 90 mixed rows / (8 x 1 x 2) = 5 steps; stage 1: 60 / 16 = 3;
    # union: the 180 stage-1 rows (the mix is a subset) / 16 = 11 steps (data_matched);
    # 3 x 3 + 5 = 14 (compute_matched)
    assert plan.as_dict() == {"stage1": {d: 3 for d in cfg.dimensions}, "fusion": 5,
                              "multitask": {"data_matched": 11, "compute_matched": 14},
                              "extra_steps": 5, "experts_train_in_fusion": True}
    frozen = replace(cfg, fusion=replace(cfg.fusion, trainable="router"))
    assert plan_steps(frozen, tiny_run.data).extra_steps == 0


def test_rows_seen_follows_the_schedule():
    tasks = [DIMS[i % 3] for i in range(50)] + ["helpful"] * 7
    train = TrainConfig(micro_batch_size=3, grad_accum_steps=2, seed=11)
    schedule = BatchSchedule(len(tasks), 3, 2, 2, 11)
    for steps in (1, 4, 9, 10):   # 4 steps per epoch: within, at and across epoch ends
        brute: dict = {}
        for s in range(steps):
            for m in range(2):
                for r in range(2):
                    for i in schedule.indices(s, m, r):
                        brute[tasks[i]] = brute.get(tasks[i], 0) + 1
        assert rows_seen(tasks, train, 2, steps) == dict(sorted(brute.items()))


def test_plan_mismatches_names_the_stage():
    plan = StepPlan({"helpful": 3}, 4, True).as_dict()
    assert plan_mismatches(plan, {"stage1.helpful": 3, "fusion": 4}) == []
    assert plan_mismatches(plan, {"fusion": 8}) == ["fusion: planned 4, ran 8"]


def test_extra_steps_needs_fusion_to_train_the_experts_and_an_expert(tiny_run, tmp_path):
    from conftest import tiny_config

    with pytest.raises(ConfigError, match="fusion.trainable='router' does not train the experts; .*router\\+experts"):
        prepare_extra_steps_job(tiny_config(SETS + ["fusion.trainable=router"]), tiny_run.root,
                                "helpful")
    run = _run_dir(tmp_path, tiny_run)
    with pytest.raises(FileNotFoundError, match=f"{run}/experts/helpful"):
        prepare_extra_steps_job(tiny_config(SETS), run, "helpful")


# ----------------------------------------------------------------------------- 2 processes

def _run_dir(root, tiny_run):
    run = root / "run"
    run.mkdir()
    for sub in ("base", "data"):   # shared read-only inputs
        os.symlink(getattr(tiny_run, sub), run / sub)
    return run


def _train_baseline(run, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "pipeline.commands", "train-baseline", *args,
           "--run-dir", str(run), *[a for s in SETS for a in ("--set", s)]]
    proc = subprocess.run(cmd, env=dist_env_vars(), capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert proc.returncode == 0, f"train-baseline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _ffn(name: str) -> bool:
    return ".mlp." in name


def _norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in a if _ffn(n)))


@pytest.mark.dist
@pytest.mark.slow
def test_multitask_data_matched_trains_one_epoch_of_the_union(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    run = _run_dir(tmp_path, tiny_run)
    _train_baseline(run, "--kind", "multitask", "--variant", "data_matched")
    out = run / "baselines" / "multitask_data_matched"
    m = read_json(out / "manifest.json")
    assert (m["stage"], m["baseline"], m["variant"], m["method"], m["world_size"]) == \
        ("baseline_multitask_data_matched", "multitask_data_matched", "data_matched", "ffn", 2)
    assert m["step_plan"] == {"stage1": {d: 3 for d in ("helpful", "harmless", "honest")},
                              "fusion": 3, "multitask": {"data_matched": 11, "compute_matched": 12},
                              "extra_steps": 3, "experts_train_in_fusion": True}
    assert m["steps"] == m["total_steps"] == 11 and len(m["history"]) == 11
    assert m["train_rows"] == 180 and m["rows_by_dimension"] == {d: 60 for d in DIMS}
    seen = m["seen_by_dimension"]   # one epoch: every row but the 180 - 11 x 16 = 4 left over
    assert sorted(seen) == DIMS and sum(seen.values()) == 11 * m["global_batch"] == 176
    assert all(56 <= n <= 60 for n in seen.values()), seen
    assert m["expert_config"]["train"]["lr"] == 0.01   # stage 1's settings
    base, trained = load_weights(run / "base"), load_weights(out)
    assert sorted(base) == sorted(trained)
    for name in base:
        assert torch.equal(base[name], trained[name]) != _ffn(name), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()


@pytest.mark.dist
@pytest.mark.slow
def test_extra_steps_continues_the_expert_on_its_own_data(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _run_dir(tmp_path, tiny_run)
    # a stand-in stage-1 expert: the base with perturbed FFN weights (far from the base)
    expert = AutoModelForCausalLM.from_pretrained(tiny_run.base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in expert.named_parameters():
            if _ffn(name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    expert.save_pretrained(run / "experts" / "helpful")
    AutoTokenizer.from_pretrained(tiny_run.base).save_pretrained(run / "experts" / "helpful")
    _train_baseline(run, "--kind", "extra_steps", "--dimension", "helpful")
    out = run / "baselines" / "extra_steps" / "helpful"
    m = read_json(out / "manifest.json")
    assert (m["stage"], m["dimension"], m["init"]) == \
        ("baseline_extra_steps", "helpful", str(run / "experts" / "helpful"))
    assert m["steps"] == m["total_steps"] == m["step_plan"]["extra_steps"] == 3
    assert m["train_rows"] == 60 and m["global_batch"] == 8         # fusion's batch, own rows
    assert m["seen_by_dimension"] == {"helpful": 24}
    assert m["expert_config"]["train"]["lr"] == 0.001               # fusion's lr
    base, start, trained = (load_weights(p) for p in (run / "base", run / "experts" / "helpful", out))
    for name in start:
        assert torch.equal(start[name], trained[name]) != _ffn(name), name
    # it started from the expert: 3 small steps from it, nowhere near the base
    assert _norm(trained, start) < 0.2 * _norm(trained, base)

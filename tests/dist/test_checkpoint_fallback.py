"""Damaged checkpoints on real DeepSpeed engines (2 gloo processes, fusion stage, ZeRO-2):

  full:       8 steps, checkpoints every 2 steps (step 2, 4, 6 and the final 8)
  truncated:  a copy whose newest model_states.pt is cut in half -> resumes from step 6
  no_tag:     a copy whose `latest` names a tag that is gone     -> resumes from step 6
both finish with the weights of `full` (1e-6); a 1-process resume of the 2-process checkpoint
and a dir with no intact checkpoint each fail before any engine, with one error.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_fuse_support import build_tiny_fused, load_weights, make_rows, result, run_jobs

pytestmark = [pytest.mark.dist, pytest.mark.slow]
OVERRIDES = ["fusion.trainable=router+experts", "fusion.train.lr=0.01", "fusion.train.save_every=2",
             "fusion.train.max_steps=8", "fusion.train.warmup_steps=2"]


def _copy_ds(src, run):
    shutil.copytree(src / "fused_ds", run / "fused_ds")
    return run / "fused_ds"


def test_damaged_newest_checkpoint_falls_back_and_world_size_change_is_refused(tmp_path):
    init = build_tiny_fused(tmp_path / "init", 3)
    (tmp_path / "rows.json").write_text(json.dumps(make_rows(3)))
    results = tmp_path / "results"

    def job(name, resume=True):
        return {"name": name, "overrides": OVERRIDES, "init": str(init),
                "rows": str(tmp_path / "rows.json"), "run": str(tmp_path / name), "resume": resume}

    assert run_jobs([job("full", resume=False)], results) == [0, 0]
    full_ds = tmp_path / "full" / "fused_ds"
    assert (full_ds / "latest").read_text().strip() == "step0000008"

    ds = _copy_ds(tmp_path / "full", tmp_path / "truncated")
    states = sorted((ds / "step0000008").glob("*model_states.pt"))
    assert states, sorted(p.name for p in (ds / "step0000008").iterdir())
    data = states[0].read_bytes()
    states[0].write_bytes(data[:len(data) // 2])
    ds = _copy_ds(tmp_path / "full", tmp_path / "no_tag")
    shutil.rmtree(ds / "step0000008")
    assert run_jobs([job("truncated"), job("no_tag")], results) == [0, 0]

    full = load_weights(tmp_path / "full" / "fused")
    for name in ("truncated", "no_tag"):
        res = result(results, name)
        assert "error" not in res, res.get("trace")
        assert len(res["grad_norms"]) == 2, f"{name}: resumed at step 6, ran steps 7 and 8"
        assert [h["step"] for h in res["history"]] == list(range(1, 9))
        weights = load_weights(tmp_path / name / "fused")
        for k in full:
            torch.testing.assert_close(weights[k], full[k], atol=1e-6, rtol=0, msg=f"{name} {k}")

    _copy_ds(tmp_path / "full", tmp_path / "one_proc")
    ds = _copy_ds(tmp_path / "full", tmp_path / "all_bad")
    for path in ds.glob("step*/*model_states.pt"):
        path.write_bytes(b"")
    run_jobs([job("one_proc"), job("all_bad")], results, world=1)
    one = result(results, "one_proc")["error"]
    assert one.startswith("ValueError:") and "saved by 2 processes but this run has 1" in one
    bad = result(results, "all_bad")["error"]
    assert "no intact checkpoint to resume from" in bad and "step0000002" in bad
    for name in ("one_proc", "all_bad"):
        assert not (tmp_path / name / "fused").exists()
        assert not (tmp_path / name / "tensorboard").exists()   # failed before any engine

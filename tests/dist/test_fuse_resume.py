"""Resume and preemption on 2 real gloo processes (fp32, same seed):

  full:      8 uninterrupted steps
  resumed:   SIGKILL at step 5 (checkpoint of step 4 survives) -> resume -> SIGUSR1 on rank 1
             only at step 7 (both ranks finish the step, checkpoint, exit 85) -> resume -> done
and the final weights and loss curve of `resumed` equal `full` to 1e-6.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_fuse_support import build_tiny_fused, load_weights, make_rows, result, run_jobs

pytestmark = [pytest.mark.dist, pytest.mark.slow]
OVERRIDES = ["fusion.trainable=router+experts", "fusion.train.lr=0.01", "fusion.gamma.helpful=1.0",
             "fusion.train.save_every=2", "fusion.train.max_steps=8", "fusion.train.warmup_steps=3"]


def test_resume_after_sigkill_and_signal_checkpoint_match_uninterrupted(tmp_path):
    init = build_tiny_fused(tmp_path / "init", 3)
    (tmp_path / "rows.json").write_text(json.dumps(make_rows(3)))
    results = tmp_path / "results"

    def job(name, run, hook=None, resume=False):
        return {"name": name, "overrides": OVERRIDES, "init": str(init), "rows": str(tmp_path / "rows.json"),
                "run": str(tmp_path / run), "hook": hook, "resume": resume}

    assert run_jobs([job("full", "full")], results) == [0, 0]
    codes = run_jobs([job("killed", "resumed", {"kind": "sigkill", "step": 5})], results)
    assert codes == [-9, -9], codes
    ds_dir = tmp_path / "resumed" / "fused_ds"
    assert (ds_dir / "latest").read_text().strip() == "step0000004"
    assert not (tmp_path / "resumed" / "fused").exists()

    signalled = job("signalled", "resumed", {"kind": "sigusr1", "step": 7, "ranks": [1]}, resume=True)
    assert run_jobs([signalled], results) == [85, 85]
    assert (ds_dir / "latest").read_text().strip() == "step0000007"
    assert (ds_dir / "hf_latest" / "model.safetensors").is_file()   # periodic consolidated model
    assert not (tmp_path / "resumed" / "fused").exists()
    assert [h["step"] for h in result(results, "signalled")["history"]] == list(range(1, 8))

    assert run_jobs([job("finish", "resumed", resume=True)], results) == [0, 0]
    full, resumed = load_weights(tmp_path / "full" / "fused"), load_weights(tmp_path / "resumed" / "fused")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=0, msg=k)
    init_w = load_weights(init)
    assert not torch.equal(init_w["model.layers.0.mlp.experts.w1"], full["model.layers.0.mlp.experts.w1"])
    curve_full = [h["loss/total"] for h in result(results, "full")["history"]]
    curve_resumed = [h["loss/total"] for h in result(results, "finish")["history"]]
    assert len(curve_full) == 8 and curve_resumed == pytest.approx(curve_full, abs=1e-6, rel=0)
    manifest = json.loads((tmp_path / "resumed" / "fused" / "fusion_train_manifest.json").read_text())
    assert manifest["steps"] == 8

"""Stage 1 on a base with a NaN weight (2 processes under torchrun, ZeRO-3): the loop's
non-finite guard stops both ranks at step 1 with exit status 3 and one error line per rank on
stderr, naming the NaN parameter (each rank holds only its ZeRO-3 partition of it); no expert is
written (before the guard, stage 1 saved an expert full of NaN and exited 0)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from test_train_expert_fixtures import (REPO, TRAIN_SETS, dist_env_vars, tiny_run,
                                        train_expert_cmd)

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_nan_in_base_stops_stage1_with_exit_3_and_no_expert(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    inputs = tiny_run(tmp_path_factory)
    run = tmp_path_factory.mktemp("nan_base")
    shutil.copytree(inputs / "base", run / "base")
    (run / "data").symlink_to(inputs / "data")
    weights = run / "base" / "model.safetensors"
    state = load_file(str(weights))
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})

    proc = subprocess.run(train_expert_cmd(run, "helpful", TRAIN_SETS
                                           + ["train.max_steps=3"]),
                          env=dist_env_vars(), capture_output=True, text=True, timeout=600, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "h3fusion train-expert: error:" not in proc.stdout, out
    # one line per rank; a rank's line may follow rank 0's open progress bar on the same pipe
    prefix = "h3fusion train-expert: error:"
    errors = [prefix + part.splitlines()[0] for part in proc.stderr.split(prefix)[1:]]
    assert len(errors) == 2, out
    assert all("loss is nan" in e and "at step 1" in e and "none saved yet" in e for e in errors)
    assert all(f"parameter {key} holds NaN/inf already in the weights this run started from "
               "(the input model)" in e for e in errors), errors
    assert "exitcode  : 3" in out or "exit code 3" in out or "exitcode: 3" in out, out[-3000:]
    assert not (run / "experts" / "helpful").exists()

"""zero_to_hf: DeepSpeed ZeRO-3 checkpoints of real 2-process runs -> HF safetensors whose tensors
equal the consolidated model the trainer wrote (FFN run; LoRA run merged)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.backends.zero_to_hf import zero_to_hf
from test_train_expert import FFN_SETS, LORA_SETS
from test_train_expert_fixtures import REPO, dist_env_vars, load_weights, run_expert

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def test_ffn_checkpoint_to_sharded_hf_equals_trainer_output(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_expert(tmp_path_factory, "ffn", "helpful", FFN_SETS)
    ds_dir = run / "experts_ds" / "helpful"
    out = tmp_path / "hf"
    info = zero_to_hf(ds_dir, run / "base", out, max_shard_size="60KB")
    assert info["tag"] == "step0000012"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    _assert_same(load_weights(out), load_weights(run / "experts" / "helpful"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)

    # the thin tool script, on an earlier tag: a different (earlier) point of the same run
    early = tmp_path / "early"
    proc = subprocess.run([sys.executable, "tools/surgery/zero_to_hf.py", "--ds-dir", str(ds_dir),
                           "--config-from", str(run / "base"), "--out", str(early),
                           "--tag", "step0000002"], cwd=REPO, env=dist_env_vars(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    early_w, final_w = load_weights(early), load_weights(out)
    assert not torch.equal(early_w["model.layers.0.mlp.up_proj.weight"],
                           final_w["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(early_w["model.embed_tokens.weight"], final_w["model.embed_tokens.weight"])

    with pytest.raises(FileNotFoundError, match="no checkpoint tag 'step9'"):
        zero_to_hf(ds_dir, run / "base", tmp_path / "x", tag="step9")
    with pytest.raises(FileNotFoundError, match="checkpoint dir not found"):
        zero_to_hf(tmp_path / "nope", run / "base", tmp_path / "y")


def test_lora_checkpoint_to_merged_hf_equals_trainer_output(tmp_path_factory, tmp_path):
    run = run_expert(tmp_path_factory, "lora", "harmless", LORA_SETS)
    out = tmp_path / "hf"
    info = zero_to_hf(run / "experts_ds" / "harmless", run / "base", out)
    assert info["lora"]["r"] == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    _assert_same(load_weights(out), load_weights(run / "experts" / "harmless"), atol=1e-6)

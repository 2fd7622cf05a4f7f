"""Stage 1 under real DeepSpeed ZeRO-3, 2 processes (torchrun, gloo, fp32 on CPU): FFN and LoRA.

One run per method; each test checks several things on it because DeepSpeed start-up on CPU
dominates the cost."""
from __future__ import annotations

import pytest
import torch

from pipeline.io_utils import read_json
from test_train_expert_fixtures import TRAIN_SETS, load_weights, run_expert

pytestmark = [pytest.mark.dist, pytest.mark.slow]
FFN_SETS = TRAIN_SETS + ["train.max_steps=12", "train.save_every=2"]  # also the resume reference
LORA_SETS = TRAIN_SETS + ["method=lora", "lora.r=4", "lora.alpha=8.0", "train.max_steps=3"]


def _is_ffn(name: str) -> bool:
    return ".mlp." in name


def _check_only_ffn_changed(base: dict, expert: dict) -> None:
    assert sorted(base) == sorted(expert)
    for name in base:
        if _is_ffn(name):
            assert not torch.equal(base[name], expert[name]), f"{name} did not train"
        else:
            assert torch.equal(base[name], expert[name]), f"frozen {name} changed"


def _check_partitioned(manifest: dict, trainable_numel: int) -> None:
    """Each rank's ZeRO-3 shards hold ~1/world of every parameter (padding <= 1 per tensor) and
    its optimizer masters ~1/world of the trainable ones."""
    parts = manifest["zero3_partitions"]
    assert [p["rank"] for p in parts] == [0, 1]
    for p in parts:
        full = p["full_param_numel"]
        assert abs(2 * p["local_param_numel"] - full) <= 64, p
        assert abs(2 * p["optimizer_master_numel"] - trainable_numel) <= 64, p
        assert p["optimizer_state_bytes"] >= 3 * 4 * p["optimizer_master_numel"]  # master + m + v


def _tensorboard_tags(tb_dir) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_ffn_zero3_trains_only_ffn_with_real_partitioning(tmp_path_factory):
    run = run_expert(tmp_path_factory, "ffn", "helpful", FFN_SETS)
    out = run / "experts" / "helpful"
    manifest = read_json(out / "manifest.json")
    assert (manifest["steps"], manifest["method"], manifest["world_size"]) == (12, "ffn", 2)
    assert manifest["global_batch"] == 16 and manifest["resumed_from"] is None
    assert manifest["seen_by_dimension"] == {"helpful": 12 * 16}   # 12 steps cross epochs
    base, expert = load_weights(run / "base"), load_weights(out)
    _check_only_ffn_changed(base, expert)
    ffn_numel = sum(t.numel() for n, t in base.items() if _is_ffn(n))
    _check_partitioned(manifest, ffn_numel)
    losses = [h["train/loss"] for h in manifest["history"]]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= \
        _tensorboard_tags(run / "tensorboard" / "expert_helpful")
    ds = run / "experts_ds" / "helpful"
    tag = (ds / "latest").read_text()
    assert tag == "step0000012"
    assert sorted(p.name for p in (ds / tag).glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_lora_zero3_saves_adapter_and_merged_model(tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = run_expert(tmp_path_factory, "lora", "harmless", LORA_SETS)
    out = run / "experts" / "harmless"
    manifest = read_json(out / "manifest.json")
    assert (manifest["steps"], manifest["method"]) == (3, "lora")
    base, merged = load_weights(run / "base"), load_weights(out)
    _check_only_ffn_changed(base, merged)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"),
                                     out / "adapter")
    lora_numel = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora_numel == 2 * 4 * (96 + 96 + 96)  # layers x r x sum over gate/up/down of (in + out)
    _check_partitioned(manifest, lora_numel)
    reference = peft.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_cpu_bf16_zero3_tracks_fp32_and_keeps_fp32_checkpoints(tmp_path_factory):
    """expert.train.precision=bf16 on the CPU (autocast forward, ZeRO-3 gathering fp32 shards):
    the losses of the first 3 steps (warmup: the same LR as the 12-step fp32 run's) within
    0.5% of fp32's, and the DeepSpeed checkpoint and the saved model fp32."""
    reference = read_json(run_expert(tmp_path_factory, "ffn", "helpful", FFN_SETS)
                          / "experts" / "helpful" / "manifest.json")
    run = run_expert(tmp_path_factory, "ffn_bf16", "helpful",
                     TRAIN_SETS + ["train.max_steps=3", "train.precision=bf16"])
    manifest = read_json(run / "experts" / "helpful" / "manifest.json")
    assert (manifest["precision"]["resolved"], manifest["ds_config"]["bf16"]["enabled"]) == \
        ("bf16", False)
    fp32 = [h["train/loss"] for h in reference["history"][:3]]
    bf16 = [h["train/loss"] for h in manifest["history"]]
    assert all(abs(a - b) < 0.005 * a for a, b in zip(fp32, bf16)) and len(bf16) == 3, (fp32, bf16)
    # and not fp32 in disguise: an fp32 run gives these 3 steps' losses bit for bit (the warmup
    # LRs and the data order do not depend on max_steps); DeepSpeed's forward would switch an
    # outer autocast off if it took it for its own (deepspeed.runtime.torch_autocast)
    assert fp32 != bf16
    assert {t.dtype for t in load_weights(run / "experts" / "helpful").values()} == {torch.float32}
    states = torch.load(next((run / "experts_ds" / "helpful" / "step0000003").glob(
        "*optim_states.pt")), weights_only=False)["optimizer_state_dict"]
    flat = states["fp32_flat_groups"] + [t for s in states["optimizer_state_dict"]["state"].values()
                                         for t in s.values() if t.dim()]
    assert flat and {t.dtype for t in flat} == {torch.float32}

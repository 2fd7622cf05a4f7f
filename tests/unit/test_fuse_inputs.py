"""`h3fusion fuse` rejects bad input with one clear error before any process group or engine."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.commands import main as cli_main
from pipeline.config import ConfigError, load_config
from pipeline.layout import RunLayout
from pipeline.train.fusion.stage import (FusionPaths, check_fusion_settings, check_label_width,
                                 read_fused_config, train_fusion)

MODEL = {"model_type": "h3fusion", "num_experts": 3, "num_experts_per_tok": 2, "expert_names": ["helpful", "harmless", "honest"]}


def _fusion(*overrides):
    """The tiny preset's fusion section with `overrides`. top_k / ep_degree are set after loading:
    a config refuses values above its number of dimensions, and fuse.py checks them again
    against the model it trains (an --init need not have the config's experts)."""
    late = {k: o.split("=")[1] for o in overrides
            if (k := o.split("=")[0].removeprefix("fusion.")) in ("top_k", "ep_degree")}
    rest = [o for o in overrides if o.split("=")[0].removeprefix("fusion.") not in late]
    return dataclasses.replace(load_config("tiny", rest).fusion,
                               **{k: int(v) for k, v in late.items()})


def test_not_an_h3fusion_model_points_to_build_moe(tmp_path):
    with pytest.raises(FileNotFoundError, match="surgery build_moe"):
        read_fused_config(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model, not an H3Fusion MoE.*surgery build_moe"):
        read_fused_config(tmp_path)


def test_cli_reports_missing_fused_init(tmp_path, capsys):
    rc = cli_main(["fuse", "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fused_init" in err and "surgery build_moe" in err


@pytest.mark.parametrize("overrides,world,stage,match", [
    (["fusion.ep_degree=4"], 4, 2, "ep_degree=4 exceeds the number of experts 3"),
    (["fusion.ep_degree=2", "fusion.moe_backend=megablocks"], 2, 2,
     "does not divide the number of experts 3, which fusion.moe_backend=megablocks needs"),
    (["fusion.ep_degree=3"], 2, 2, "does not divide the world size 2"),
    (["fusion.ep_degree=3"], 3, 3, "ZeRO-3 partitions the experts"),
    # the built model's num_experts_per_tok is the routing top-k's one source
    (["fusion.top_k=1"], 2, 2, "fusion.top_k=1, but the fused model was built with "
                               "num_experts_per_tok=2: rebuild it"),
    (["fusion.trainable=router+experts", "fusion.gamma.honest=0.1"], 2, 3, "drift penalty"),
    ([], 2, 1, "ZeRO stage 2 or 3"),
])
def test_settings_checks(overrides, world, stage, match):
    with pytest.raises(ConfigError, match=match):
        check_fusion_settings(_fusion(*overrides), MODEL, world, stage)


def test_gamma_for_missing_expert_is_an_error_only_when_nonzero():
    two = {"model_type": "h3fusion", "num_experts": 2, "num_experts_per_tok": 2, "expert_names": ["helpful", "harmless"]}
    check_fusion_settings(_fusion(), two, 2, 2)   # default gamma lists 'honest' with 0: fine
    with pytest.raises(ConfigError, match=r"experts \['honest'\].*its experts: \['helpful', 'harmless'\]"):
        check_fusion_settings(_fusion("fusion.gamma.honest=0.5"), two, 2, 2)
    check_fusion_settings(_fusion("fusion.ep_degree=3"), MODEL, 3, 2)   # a valid EP set-up


def test_uneven_expert_parallel_split_is_accepted_on_the_torch_backend():
    # E=3 on 2 ranks: one rank owns 2 experts, the other 1 (model/expert_parallel.py)
    check_fusion_settings(_fusion("fusion.ep_degree=2"), MODEL, 2, 2)
    check_fusion_settings(_fusion("fusion.ep_degree=2"), MODEL, 4, 2)   # 2 EP groups x 2 ranks
    check_fusion_settings(_fusion("fusion.ep_degree=3", "fusion.moe_backend=megablocks"), MODEL, 3, 2)


def test_label_width_must_match_experts():
    check_label_width(3, MODEL, "data")
    with pytest.raises(ValueError, match="task_label has width 2 but the fused model has 3 experts"):
        check_label_width(2, MODEL, "data")


def test_train_fusion_rejects_wrong_label_width_before_training(tmp_path):
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM

    cfg = H3FusionConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=3, pad_token_id=0)
    torch.manual_seed(0)
    H3FusionForCausalLM(cfg).save_pretrained(tmp_path / "init")
    rows = [{"input_ids": [3, 4, 5], "attention_mask": [1, 1, 1], "labels": [-100, 4, 5],
             "task_label": [1.0, 0.0]}] * 8
    paths = FusionPaths.for_run(RunLayout.at(tmp_path / "run"), str(tmp_path / "init"))
    with pytest.raises(ValueError, match="width 2 but the fused model has 3 experts"):
        train_fusion(load_config("tiny"), paths, rows=rows)
    assert not (tmp_path / "run").exists()   # nothing written, no engine built

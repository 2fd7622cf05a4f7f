"""Stage 1 bad input: one clear error, raised before any process group exists (single process,
no DeepSpeed engine). Also the pure pieces: DS JSON resolution and the deterministic data order."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.backends.deepspeed_engine import DsTrainSettings, load_ds_config, resolve_ds_config
from pipeline.commands import main as cli_main
from pipeline.config import load_config
from pipeline.train.common import BatchSchedule
from pipeline.train.expert.stage import prepare_job

DS_OK = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "bf16": {"enabled": "auto"},
         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
SETTINGS = DsTrainSettings(micro_batch_size=4, grad_accum_steps=2, grad_clip=1.0, lr=1e-3,
                           weight_decay=0.0, world_size=2)


def save_split(path, num_rows: int) -> None:
    from datasets import Dataset

    Dataset.from_dict({"instruction": ["q"] * num_rows, "input": [""] * num_rows,
                       "response": ["a"] * num_rows}).save_to_disk(str(path))


@pytest.fixture
def run_dir(tmp_path):
    """Just enough of a run for the checks: a 1-layer Llama and a 64-row train split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    save_split(tmp_path / "data" / "sft" / "helpful" / "train", 64)
    return tmp_path


def _ds_file(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _job(run_dir, *sets, dimension="helpful", **kw):
    return prepare_job(load_config("tiny", list(sets)), run_dir, dimension, **kw)


def test_cli_rejects_unknown_dimension_without_a_process_group(run_dir, capsys):
    rc = cli_main(["train-expert", "--dimension", "funny", "--run-dir", str(run_dir)])
    assert rc == 2 and "unknown dimension 'funny'" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_base_missing_or_not_llama(run_dir, tmp_path):
    import shutil

    from transformers import GPT2Config

    shutil.rmtree(run_dir / "base")
    with pytest.raises(FileNotFoundError, match="base model dir not found"):
        _job(run_dir)
    GPT2Config(n_layer=1).save_pretrained(run_dir / "base")
    with pytest.raises(ValueError, match="not Llama-style"):
        _job(run_dir)


def test_missing_data_existing_output_and_resume_without_checkpoint(run_dir):
    with pytest.raises(FileNotFoundError, match="sft/harmless/train"):
        _job(run_dir, dimension="harmless")
    with pytest.raises(FileNotFoundError, match="--resume: no DeepSpeed checkpoint"):
        _job(run_dir, resume=True)
    (run_dir / "experts" / "helpful").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _job(run_dir)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ({**DS_OK, "zero_optimization": {"stage": 1}}, "stage must be 2 or 3, got 1"),
    ({**DS_OK, "zero_optimization": {"stage": 3}}, "stage3_gather_16bit_weights_on_model_save"),
    ({**DS_OK, "train_batch_size": 12}, r"train_batch_size=12 != micro_batch_size 8 x grad_accum"),
    ({**DS_OK, "train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3 disagrees"),
])
def test_bad_ds_config_names_file_and_key(run_dir, tmp_path, content, match):
    path = _ds_file(tmp_path, content)
    with pytest.raises(ValueError, match=match) as err:
        _job(run_dir, f"expert.ds_config={path}", "expert.train.micro_batch_size=8")
    assert path in str(err.value)
    assert not torch.distributed.is_initialized()


def test_missing_ds_config_file(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="DeepSpeed config not found"):
        _job(run_dir, f"expert.ds_config={tmp_path / 'nope.json'}")


def test_valid_job_resolves_repo_ds_config(run_dir):
    job = _job(run_dir, "expert.train.micro_batch_size=3", "expert.train.grad_accum_steps=5")
    ds = job.ds_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
    assert ds["train_batch_size"] == 15 * job.world_size
    assert ds["zero_optimization"]["stage"] == 3


def test_resolve_fills_auto_and_picks_precision(tmp_path):
    raw = load_ds_config(_ds_file(tmp_path, {**DS_OK, "optimizer": {"type": "AdamW",
                                                                    "params": {"lr": "auto"}}}))
    cpu = resolve_ds_config(raw, SETTINGS, accelerator="cpu")
    assert (cpu["train_batch_size"], cpu["gradient_clipping"]) == (16, 1.0)
    assert not cpu["bf16"]["enabled"] and "optimizer" not in cpu
    assert cpu["zero_force_ds_cpu_optimizer"] is False
    gpu = resolve_ds_config(raw, SETTINGS, accelerator="cuda")
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["lr"] == 1e-3
    assert "_source" not in gpu


def test_batch_schedule_is_a_deterministic_partition():
    sched = BatchSchedule(num_rows=50, micro_batch_size=3, grad_accum_steps=2, world_size=2, seed=5)
    assert sched.steps_per_epoch == 4  # 50 // 12; the last 2 rows of each epoch are dropped
    epoch0 = [i for s in range(4) for m in range(2) for r in range(2) for i in sched.indices(s, m, r)]
    assert len(epoch0) == len(set(epoch0)) == 48
    assert sched.indices(4, 0, 0) != sched.indices(0, 0, 0)  # a new permutation per epoch
    assert sched.indices(5, 1, 1) == BatchSchedule(50, 3, 2, 2, 5).indices(5, 1, 1)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        BatchSchedule(10, 3, 2, 2, 5).check("data.arrow")


@pytest.mark.parametrize("override,match", [("expert.lora.r=0", "'expert.lora.r' must be >= 1"),
                                            ("expert.lora.dropout=1.0",
                                             r"'expert.lora.dropout' must be in \[0, 1\)"),
                                            ("expert.method=full", "ffn|lora")])
def test_expert_config_values_are_checked(override, match):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_train_split_with_too_few_rows(run_dir):
    import shutil

    split = run_dir / "data" / "sft" / "helpful" / "train"
    shutil.rmtree(split)
    save_split(split, 0)
    with pytest.raises(ValueError, match="sft/helpful/train: empty split \\(0 rows\\)"):
        _job(run_dir)
    shutil.rmtree(split)
    save_split(split, 5)   # one step needs micro 8 x accum 1 x world 1 = 8
    with pytest.raises(ValueError, match=r"5 rows, fewer than one optimizer step needs \(8 = "):
        _job(run_dir, "expert.train.micro_batch_size=8")
    shutil.rmtree(split)
    split.mkdir()
    with pytest.raises(FileNotFoundError, match="is not a saved dataset"):
        _job(run_dir)


def test_truncated_or_missing_base_weights(run_dir, capsys):
    weights = run_dir / "base" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    rc = cli_main(["train-expert", "--dimension", "helpful", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"base model: {weights}: truncated or corrupt safetensors file" in err
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="base model: .*has no model weights"):
        _job(run_dir)
    assert not torch.distributed.is_initialized()


def test_unwritable_expert_output(run_dir):
    (run_dir / "experts").write_text("a file where the experts dir goes")
    with pytest.raises(PermissionError, match=r"expert output .*experts/helpful cannot be written: "
                                              r".*experts: .*is not a directory"):
        _job(run_dir)


def _fake_checkpoint(ds_dir, tag, world):
    tag_dir = ds_dir / tag
    tag_dir.mkdir(parents=True)
    for r in range(world):
        for kind in ("model", "optim"):
            torch.save({}, tag_dir / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt")
    (ds_dir / "latest").write_text(tag)


def test_checkpoint_of_another_world_size_or_none_intact(run_dir, capsys):
    ds_dir = run_dir / "experts_ds" / "helpful"
    _fake_checkpoint(ds_dir, "step0000004", world=2)
    rc = cli_main(["train-expert", "--dimension", "helpful", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "step0000004: checkpoint was saved by 2 processes but this run has 1" in err
    (ds_dir / "step0000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"PK\x03")
    with pytest.raises(ValueError, match="no intact checkpoint to resume from .*step0000004: "
                                         "zero_pp_rank_0_mp_rank_00_model_states.pt is truncated"):
        _job(run_dir, resume=True)
    assert not torch.distributed.is_initialized()

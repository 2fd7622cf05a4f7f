"""`h3fusion base`: the pre-trained tiny Llama, the schedule, and a user's base model."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from pipeline.train.base.stage import run_base_stage
from pipeline.checkpoint.gguf import check_llama_dir
from pipeline.train.base.pretrain import lr_at, pack_blocks
from pipeline.config import BaseConfig, TrainConfig


def test_tiny_base_is_a_trained_llama(tiny_run):
    manifest = json.loads((tiny_run.base / "manifest.json").read_text())
    model = LlamaForCausalLM.from_pretrained(str(tiny_run.base))
    tok = AutoTokenizer.from_pretrained(str(tiny_run.base))
    assert (tiny_run.base / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 32
    assert manifest["steps"] == 20 and manifest["loss_after"] < manifest["loss_before"] - 0.3
    assert manifest["num_params"] == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([tok.encode("Q: What is 2 + 3?\nA:", add_special_tokens=True)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < manifest["loss_before"] + 1.0


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] >= 0.1 and lrs[-1] < 0.2


def test_pack_blocks(tiny_run):
    tok = AutoTokenizer.from_pretrained(str(tiny_run.tokenizer))
    blocks = pack_blocks(["hello world"] * 50, tok, 16)
    assert blocks.shape[1] == 16 and (blocks == tok.bos_token_id).sum() >= blocks.shape[0] - 1
    with pytest.raises(ValueError, match="too small"):
        pack_blocks(["hi"], tok, 64)


def test_user_base_is_validated_and_linked(tiny_run, tmp_path):
    manifest = run_base_stage(BaseConfig(path=str(tiny_run.base)), tmp_path)
    assert manifest["kind"] == "user" and manifest["model_type"] == "llama"
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert model.config.hidden_size == 32
    not_llama = tmp_path / "gpt2"
    not_llama.mkdir()
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2).save_pretrained(str(not_llama))
    with pytest.raises(ValueError, match="not Llama-style"):
        check_llama_dir(not_llama)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_base_stage(BaseConfig(path=str(tmp_path / "missing")), tmp_path / "other")
    assert not (tmp_path / "other" / "base").exists()


def test_base_needs_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="h3fusion tokenizer"):
        run_base_stage(BaseConfig(), tmp_path)
    assert not (tmp_path / "base").exists()

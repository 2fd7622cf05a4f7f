"""LoRA merge (pipeline.checkpoint.lora) against PEFT's own merge_and_unload."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.io_utils import read_json
from pipeline.checkpoint.lora import lora_scale, merge_lora_state_dict, read_adapter, split_peft_state_dict
from pipeline.checkpoint.merge_lora import merge_lora_dir
from pipeline.checkpoint.hf_model import load_hf_state_dict

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=False))


def _save_tokenizer(out) -> None:
    """A word-level tokenizer: model dirs in this pipeline always carry one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out)


def _trained_peft(r: int, alpha: float, use_rslora: bool = False):
    """A PEFT LoRA model whose B matrices are non-zero (as after training)."""
    model = get_peft_model(_tiny_llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                     use_rslora=use_rslora, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("r,alpha,rslora", [(4, 8.0, False), (8, 4.0, False), (4, 16.0, True)])
def test_state_dict_merge_matches_peft_merge_and_unload(r, alpha, rslora):
    peft = _trained_peft(r, alpha, rslora)
    # clone: merge_and_unload below writes into the base weights in place
    base, adapter = split_peft_state_dict({k: v.clone() for k, v in peft.state_dict().items()})
    assert len(adapter) == 2 * 3 * 2 and all(".lora_" in k for k in adapter)
    assert not any("base_layer" in k or k.startswith("base_model") for k in base)
    merged = merge_lora_state_dict(base, adapter, lora_scale(r, alpha, rslora))
    reference = peft.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    changed = 0
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(merged[name], base[name])
    assert changed == 2 * 3  # exactly the adapted gate/up/down weights moved


def test_merge_lora_dir_from_saved_adapter(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _tiny_llama().save_pretrained(base_dir)
    _save_tokenizer(base_dir)
    peft = _trained_peft(4, 8.0)
    peft.save_pretrained(adapter_dir)
    info = merge_lora_dir(base_dir, adapter_dir, out)
    assert info["scale"] == 2.0 and read_json(out / "manifest.json")["kind"] == "lora-merged"
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    reference = reference.merge_and_unload().state_dict()
    merged = load_hf_state_dict(out)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
    reloaded = LlamaForCausalLM.from_pretrained(out)  # a normal HF model dir
    assert reloaded.config.hidden_size == 32 and (out / "tokenizer.json").is_file()


def test_bad_adapters_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter(tmp_path)
    peft = _trained_peft(4, 8.0)
    base, adapter = split_peft_state_dict(peft.state_dict())
    key = next(k for k in adapter if k.endswith("gate_proj.lora_A.weight"))
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora_state_dict(base, {**adapter, key: torch.zeros(4, 7)}, 2.0)
    with pytest.raises(ValueError, match="no matching lora_B"):
        merge_lora_state_dict(base, {key: adapter[key]}, 2.0)
    with pytest.raises(ValueError, match="r must be > 0"):
        lora_scale(0, 8.0)
    peft.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not LORA"):
        read_adapter(tmp_path / "a")

"""`h3fusion tokenizer`: a loadable HF Llama tokenizer with specials and an exact round trip."""
import json

import pytest
from transformers import AutoTokenizer

from pipeline.config import TokenizerConfig
from pipeline.data.template import format_prompt
from pipeline.eval import harness
from pipeline.tokenizer.stage import ROUND_TRIP_PROBE, run_tokenizer_stage


def test_trained_tokenizer_loads_with_specials(tiny_run):
    tok = AutoTokenizer.from_pretrained(str(tiny_run.tokenizer))
    manifest = json.loads((tiny_run.tokenizer / "manifest.json").read_text())
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) == manifest["vocab_size"] <= 512
    assert (tiny_run.tokenizer / "sentencepiece.model").is_file()
    # no BOS from encode(): the lm-eval protocol (eval/harness.py) then adds none either, as in
    # every tiny report so far; a transformers default that adds one would change mc*_harness
    assert not harness.adds_bos(tok)


@pytest.mark.parametrize("text", [ROUND_TRIP_PROBE, format_prompt("Sort these.", "3, 1") + "1, 3",
                                  "double  spaces and\ttabs\n\n", "Zürich: 12°C — 😀"])
def test_round_trip(tiny_run, text):
    tok = AutoTokenizer.from_pretrained(str(tiny_run.tokenizer))
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids                       # byte fallback covers everything
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_the_corpus(tiny_run):
    tok = AutoTokenizer.from_pretrained(str(tiny_run.tokenizer))
    text = format_prompt("Quick question: What is 12 + 30?")
    assert len(tok.encode(text, add_special_tokens=False)) < len(text) / 2.5


def test_copy_user_tokenizer_and_missing_path(tiny_run, tmp_path):
    manifest = run_tokenizer_stage(TokenizerConfig(path=str(tiny_run.tokenizer)), tmp_path)
    assert manifest["source"]["kind"] == "copied"
    a = AutoTokenizer.from_pretrained(str(tiny_run.tokenizer))
    b = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert a.encode(ROUND_TRIP_PROBE) == b.encode(ROUND_TRIP_PROBE)
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        run_tokenizer_stage(TokenizerConfig(path=str(tmp_path / "nope")), tmp_path / "other")
    assert not (tmp_path / "other" / "tokenizer").exists()


def test_needs_data_and_sane_vocab(tmp_path, tiny_run):
    with pytest.raises(FileNotFoundError, match="h3fusion data"):
        run_tokenizer_stage(TokenizerConfig(), tmp_path)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "data").symlink_to(tiny_run.data)
    with pytest.raises(ValueError, match="vocab_size must be >= 300"):
        run_tokenizer_stage(TokenizerConfig(vocab_size=100), run)
    assert not (run / "tokenizer").exists()


def test_vocab_smaller_than_the_corpus_alphabet_is_a_named_error(tmp_path, tiny_run):
    # 320 pieces pass the >= 300 check but are fewer than the built-in corpus's characters
    # need: sentencepiece's bare RuntimeError becomes one error naming the key
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(tiny_run.data)
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=320: sentencepiece cannot train"):
        run_tokenizer_stage(TokenizerConfig(vocab_size=320), run)
    assert not (run / "tokenizer").exists() and not list(run.glob(".tokenizer.*"))

"""Hub ids (`hf:ORG/NAME[@REVISION]`, `hf:ORG/NAME/FILE`) resolved through a fake Hugging Face
cache with the real layout (models--org--name/refs/main, snapshots/<commit>/, blobs/) and no
network: HF_HUB_CACHE points at tmp_path, HF_HUB_OFFLINE=1 unless a test says otherwise."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.checkpoint.hub import HubUnavailableError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with a word-level tokenizer, saved as a hub repo would hold it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    out = tmp_path_factory.mktemp("tiny_hub_model")
    words = ["<unk>", "<s>", "</s>", "<pad>", "hello", "world", "the", "a"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(out)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32)).save_pretrained(out)
    return out


def add_to_cache(cache, repo_id, src, repo_type="model", ref="main", commit=COMMIT, skip=()):
    """`src`'s files as snapshot `commit` of `repo_id` (blobs + relative symlinks, refs/<ref>)."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in skip:
            continue
        blob = folder / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_cached_id_resolves_to_its_snapshot_by_branch_and_by_commit(hub_cache, tiny_model_dir):
    snap = add_to_cache(hub_cache, "org/tiny", tiny_model_dir)
    for spec in ("hf:org/tiny", f"hf:org/tiny@{COMMIT}"):
        resolved = resolve_model(spec, "base.path")
        assert resolved.path == snap and resolved.commit == COMMIT
    assert resolve_model("hf:org/tiny", "tokenizer.path", weights=False).path == snap


def test_uncached_id_offline_is_one_error_before_any_output(hub_cache, tmp_path):
    from pipeline.train.base.stage import run_base_stage
    from pipeline.config import BaseConfig, TokenizerConfig
    from pipeline.tokenizer.stage import run_tokenizer_stage
    run = tmp_path / "run"
    with pytest.raises(HubUnavailableError) as err:
        run_base_stage(BaseConfig(path="hf:org/missing"), run)
    msg = str(err.value)
    for part in ("base.path: hf:org/missing is not in the Hugging Face cache", str(hub_cache),
                 "HF_HUB_OFFLINE is set", "local directory holding config.json and *.safetensors",
                 "`hf download org/missing`"):
        assert part in msg
    with pytest.raises(HubUnavailableError, match="tokenizer.path: hf:org/missing .*tokenizer files"):
        run_tokenizer_stage(TokenizerConfig(path="hf:org/missing"), run)
    assert not run.exists()


def test_uncached_revision_and_incomplete_snapshot_are_clear_errors(hub_cache, tiny_model_dir):
    add_to_cache(hub_cache, "org/tiny", tiny_model_dir)
    with pytest.raises(HubUnavailableError, match=r"hf:org/tiny@v2 is not in the Hugging Face cache"
                                                  r".*`hf download org/tiny --revision v2`"):
        resolve_model("hf:org/tiny@v2", "base.path")
    # a tokenizer-only snapshot (what the tokenizer stage fetches) serves the tokenizer, not the base
    add_to_cache(hub_cache, "org/tok", tiny_model_dir, skip=("model.safetensors",))
    assert resolve_model("hf:org/tok", "tokenizer.path", weights=False).commit == COMMIT
    with pytest.raises(HubUnavailableError, match="hf:org/tok: its cached copy is incomplete "
                                                  r"\(snapshot .* has no \*.safetensors"):
        resolve_model("hf:org/tok", "base.path")


def test_unreachable_hub_without_offline_flag_is_the_same_error(hub_cache, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    with pytest.raises(HubUnavailableError, match="hf:org/missing is not in the Hugging Face cache "
                                                  ".* and the Hub cannot be reached; set base.path"):
        resolve_model("hf:org/missing", "base.path")


@pytest.mark.parametrize("name, says", [
    ("GatedRepoError", " is gated on the Hub: accept its licence .* or set base.path to a local"),
    ("RepositoryNotFoundError", ": no such repo on the Hub"),
    ("RevisionNotFoundError", ": the Hub has no such revision"),
    ("EntryNotFoundError", ": the repo has no such file")])
def test_refusals_of_the_hub_are_one_error_each(name, says, hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cls = getattr(errors, name)
    refusal = cls.__new__(cls)          # the hub's HTTP errors want a live response to build
    Exception.__init__(refusal, "the Hub says no")

    def snapshot_download(repo_id, local_files_only, **kwargs):
        raise errors.LocalEntryNotFoundError("not cached") if local_files_only else refusal

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(HubUnavailableError, match=f"^base.path: hf:org/x@v1{says}"):
        resolve_model("hf:org/x@v1", "base.path")


def test_base_and_tokenizer_stages_from_a_hub_id(hub_cache, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM
    from pipeline.train.base.stage import run_base_stage
    from pipeline.config import BaseConfig, TokenizerConfig
    from pipeline.tokenizer.stage import run_tokenizer_stage
    snap = add_to_cache(hub_cache, "org/tiny", tiny_model_dir)
    run = tmp_path / "run"
    manifest = run_base_stage(BaseConfig(path="hf:org/tiny"), run)
    assert manifest["hub"] == {"id": "org/tiny", "revision": "main", "commit": COMMIT, "snapshot": str(snap)}
    assert manifest["path"] == str(snap) and manifest["model_type"] == "llama"
    model = LlamaForCausalLM.from_pretrained(str(run / "base"))
    assert model.config.num_hidden_layers == 2
    tok_manifest = run_tokenizer_stage(TokenizerConfig(path="hf:org/tiny"), run)
    assert tok_manifest["source"]["hub"]["commit"] == COMMIT
    assert AutoTokenizer.from_pretrained(str(run / "tokenizer"))("hello world").input_ids == [4, 5]


def test_h3fusion_run_refuses_an_unavailable_id_before_its_first_stage(hub_cache, tmp_path, capsys):
    from pipeline.commands import main
    run = tmp_path / "run"
    rc = main(["run", "--config", "tiny", "--run-dir", str(run), "--set", "base.path=hf:org/base",
               "--set", "tokenizer.path=hf:org/tok"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("h3fusion run: error: tokenizer.path: hf:org/tok is not in the "
                             "Hugging Face cache")
    assert not (run / "resolved_config.yaml").exists() and not (run / "data").exists()


def test_hub_data_file_is_read_from_the_cache_and_missing_ones_offline_are_one_error(
        hub_cache, tmp_path):
    from pipeline.data.loaders import load_alpaca_eval, read_records
    from pipeline.data.real import _source_info
    src = tmp_path / "repo"
    src.mkdir()
    rows = [{"instruction": "Say hi.", "output": "Hi.", "generator": "ref", "dataset": "x"}]
    (src / "alpaca_eval.json").write_text(json.dumps(rows))
    snap = add_to_cache(hub_cache, "org/evals", src, repo_type="dataset")
    assert load_alpaca_eval("hf:org/evals/alpaca_eval.json")[0]["output"] == "Hi."
    source = _source_info("hf:org/evals/alpaca_eval.json", rows)     # the data manifest's entry
    assert source["file"] == str(snap / "alpaca_eval.json") and len(source["sha256"]) == 64
    with pytest.raises(HubUnavailableError, match=r"hf:org/evals/other.json is not in the Hugging "
                                                  r"Face cache .*point this data.real key at a local"):
        read_records("hf:org/evals/other.json")


def test_hub_dataset_offline_and_not_cached_is_one_error(tmp_path, monkeypatch):
    import datasets
    from pipeline.data.loaders import read_records
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(HubUnavailableError, match=r"hf:org/nothing@30k_train is not in the datasets "
                                                  r"cache .*point this data.real key at a local"):
        read_records("hf:org/nothing@30k_train")

    def script_dataset(*args, **kwargs):   # what datasets >= 4 says for a loading-script repo
        raise RuntimeError("Dataset scripts are no longer supported, but found alpaca_eval.py")

    monkeypatch.setattr(datasets, "load_dataset", script_dataset)
    with pytest.raises(ValueError, match=r"hf:tatsu-lab/alpaca_eval is a loading-script dataset.*"
                                         r"hf:tatsu-lab/alpaca_eval/FILE"):
        read_records("hf:tatsu-lab/alpaca_eval")


def test_config_checks_hub_spec_syntax_and_hints_at_the_prefix(tmp_path):
    from pipeline.train.base.stage import run_base_stage
    from pipeline.config import BaseConfig, ConfigError, load_config
    cfg = load_config("llama2-7b")
    assert (cfg.base.path, cfg.data.real.beavertails) == ("hf:meta-llama/Llama-2-7b-hf",
                                                           "hf:PKU-Alignment/BeaverTails@30k_train")
    for bad, key in (("base.path=hf:org/a/b", "base.path"), ("tokenizer.path=hf:org/a@", "tokenizer.path"),
                     ("data.real.alpaca=hf:bad name", "data.real.alpaca")):
        with pytest.raises(ConfigError, match=f"{key}: .* is not a hub"):
            load_config("llama2-7b", [bad])
    with pytest.raises(FileNotFoundError, match="write base.path: hf:meta-llama/Llama-2-7b-hf"):
        run_base_stage(BaseConfig(path="meta-llama/Llama-2-7b-hf"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_slurm_resolve_fetch_hub_fails_before_writing_and_passes_with_a_cached_id(
        hub_cache, tiny_model_dir, tmp_path, capsys):
    """slurm/pipeline.sh fetches hub models on the login node (`resolve --fetch-hub`)."""
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "slurm" / "stage_info.py"
    spec = importlib.util.spec_from_file_location("stage_info_for_hub_test", path)
    stage_info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage_info)
    out = tmp_path / "resolved.yaml"
    argv = ["resolve", "tiny", str(out), "--fetch-hub", "base.path=hf:org/base"]
    with pytest.raises(FileNotFoundError, match="hf:org/base is not in the Hugging Face cache"):
        stage_info.main(argv)
    assert not out.exists()
    add_to_cache(hub_cache, "org/base", tiny_model_dir)
    assert stage_info.main(argv) == 0 and out.is_file()
    assert "base.path: hf:org/base ->" in capsys.readouterr().err

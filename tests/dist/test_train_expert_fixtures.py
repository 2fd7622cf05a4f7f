"""Shared helpers for the stage-1 dist tests (no tests here): a tiny run dir (data, tokenizer,
2-layer base Llama) built once per session, and real 2-process `h3fusion train-expert` runs
under torchrun, cached by name so several test modules can inspect the same run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.env import free_port

_CACHE: dict = {}
REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128)
# fp32 on CPU, 2 ranks x micro 4 x accum 2 = 16 rows per step, 48 rows -> 3 steps per epoch
TRAIN_SETS = ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.max_seq_len=64",
              "train.log_every=1", "train.warmup_steps=2", "train.lr=0.01", "train.seed=7",
              "train.weight_decay=0.01"]



def dist_env_vars() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def build_tiny_run(root: Path) -> Path:
    """data + tokenizer + an untrained tiny base Llama (the expert stage's inputs)."""
    from transformers import AutoTokenizer

    from pipeline.train.base.stage import build_tiny_llama
    from pipeline.config import TinyModelConfig, load_config
    from pipeline.data.stage import run_data_stage
    from pipeline.layout import RunLayout
    from pipeline.tokenizer.stage import run_tokenizer_stage

    cfg = load_config("tiny", ["data.builtin.train_per_task=48", "data.builtin.dev_per_task=4",
                               "data.builtin.test_per_task=4", "tokenizer.vocab_size=512"])
    run_data_stage(cfg, root)
    run_tokenizer_stage(cfg.tokenizer, root)
    layout = RunLayout.at(root)
    tok = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    model = build_tiny_llama(TinyModelConfig(**TINY_MODEL), tok, seed=3)
    model.save_pretrained(str(layout.base))
    tok.save_pretrained(str(layout.base))
    return root


def tiny_run(tmp_path_factory) -> Path:
    if "tiny_run" not in _CACHE:
        _CACHE["tiny_run"] = build_tiny_run(tmp_path_factory.mktemp("expert_inputs"))
    return _CACHE["tiny_run"]


def new_run_dir(tmp_path_factory, name: str, inputs: Path) -> Path:
    """A fresh run dir that shares the (read-only) base and data of `inputs`."""
    run = tmp_path_factory.mktemp(name)
    for sub in ("base", "data"):
        os.symlink(inputs / sub, run / sub)
    return run


def train_expert_cmd(run: Path, dimension: str, sets: list[str], extra: tuple = ()) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "pipeline.commands", "train-expert",
           "--dimension", dimension, "--run-dir", str(run), *extra]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_expert(tmp_path_factory, name: str, dimension: str, sets: list[str],
               timeout: float = 600) -> Path:
    """A finished 2-process expert run (cached by `name`); fails with the log on error."""
    if name not in _CACHE:
        run = new_run_dir(tmp_path_factory, name, tiny_run(tmp_path_factory))
        proc = subprocess.run(train_expert_cmd(run, dimension, sets), env=dist_env_vars(),
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)
        assert proc.returncode == 0, f"train-expert failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        _CACHE[name] = run
    return _CACHE[name]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint.hf_model import load_hf_state_dict

    return load_hf_state_dict(model_dir)

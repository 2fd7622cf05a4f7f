#!/usr/bin/env python
"""Per-rank ZeRO-3 memory of the stage-1 expert setup: parameter shards and optimizer state.

For each world size (default 1, 2, 4) it spawns that many real processes (gloo, CPU, fp32),
builds the expert engine exactly as `h3fusion train-expert` does (ds_configs/zero3_expert.json,
FFN trainable, torch AdamW), runs one optimizer step so Adam's moments exist, and reads what each
rank really holds from the engine (`param.ds_tensor`, the optimizer's fp32 partitions and state).

    python tools/profiling/zero3_memory.py [--world-sizes 1 2 4] [--model-dir runs/tiny/base]
        [--method ffn|lora] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a plain checkout

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pipeline.config import TinyModelConfig  # noqa: E402
from pipeline.env import DistEnv, export_dist_env, free_port  # noqa: E402



def _build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model_dir:
        return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    t = TinyModelConfig()
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads))


def _trainable(model, method: str, r: int):
    from pipeline.train.expert.stage import mark_ffn_trainable

    if method == "ffn":
        mark_ffn_trainable(model)
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM",
                                            target_modules=["gate_proj", "up_proj", "down_proj"]))


def _worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    export_dist_env(DistEnv(rank, world, rank, "127.0.0.1", port))
    from pipeline.backends import deepspeed_engine as dse

    ds = dse.resolve_ds_config(dse.load_ds_config(args.ds_config), dse.DsTrainSettings(
        micro_batch_size=2, grad_accum_steps=1, grad_clip=1.0, lr=1e-3, weight_decay=0.0,
        world_size=world), accelerator="cpu")
    dse.init_distributed()
    model = _trainable(_build_model(args), args.method, args.lora_r)
    engine = dse.build_engine(model, ds, [p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    report = dse.partition_report(engine)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def measure(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def format_table(results: dict[int, list[dict]]) -> str:
    rows = [f"{'world':>5} {'rank':>4} {'full params':>12} {'local params':>12} "
            f"{'param MiB':>10} {'optim MiB':>10} {'param frac':>10}"]
    for world, reports in results.items():
        for r in reports:
            frac = r["local_param_numel"] / r["full_param_numel"]
            rows.append(f"{world:>5} {r['rank']:>4} {r['full_param_numel']:>12,} "
                        f"{r['local_param_numel']:>12,} {r['local_param_bytes'] / 2**20:>10.3f} "
                        f"{r['optimizer_state_bytes'] / 2**20:>10.3f} {frac:>10.3f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model-dir", default=None, help="HF Llama dir (default: tiny preset shape)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--method", choices=["ffn", "lora"], default="ffn")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--ds-config", default="ds_configs/zero3_expert.json")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {w: measure(w, args) for w in args.world_sizes}
    print(format_table(results))
    payload = {"method": args.method, "model_dir": args.model_dir, "per_world_size": results}
    text = json.dumps(payload, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Stage 2 (fusion) smoke run: a SmolLM2-135M-SHAPED H3Fusion MoE, RANDOMLY INITIALISED (not the
real SmolLM2 weights: its 98 MB GGUF is too large to carry to the GPU machine), trained for
`--steps` optimizer steps by the real `pipeline.train.fusion.stage.train_fusion` (DeepSpeed ZeRO-2 from
ds_configs/zero2_fusion_ep.json: bf16 on a GPU, fp32 on the CPU) on synthetic pre-tokenized rows
(each task's tokens come from its own id range, so routing can separate the tasks; no `datasets`
needed). One process. Passes when every loss is finite and the mean total loss of the last 5
steps is below that of the first 5; with --require-cuda also when the engine's parameters are
bf16 on the GPU. Writes `fusion_smoke.json` into --out; exit status 0 = pass, 1 = fail.

  python tools/gpu/fusion_smoke.py --out /tmp/fs --require-cuda            # tools/gpu/check.sh
  python tools/gpu/fusion_smoke.py --shape tiny --steps 8 --out /tmp/fs    # CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

from pipeline.env import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ZERO2 = REPO / "ds_configs" / "zero2_fusion_ep.json"
# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M): the MoE gets 3 experts of its FFN
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=True),
}
WINDOW = 5   # steps averaged at each end for "decreasing"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="dir for fusion_smoke.json")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--moe-backend", default="torch", help="fusion.moe_backend (torch | megablocks)")
    p.add_argument("--work", default=None, help="scratch dir for the model and the run "
                                                "(default: a temporary dir, removed after)")
    p.add_argument("--require-cuda", action="store_true",
                   help="fail unless the engine's parameters are bf16 on a CUDA device")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 2 * WINDOW:
        p.error(f"--steps must be >= {2 * WINDOW} (first {WINDOW} vs last {WINDOW} steps)")
    if min(args.micro_batch, args.seq_len) < 1 or args.seq_len < 16:
        p.error("--micro-batch must be >= 1 and --seq-len >= 16")
    return args


def build_init(out: Path, shape: str, seed: int) -> int:
    """Save a random H3Fusion MoE of `shape` (3 independent random experts, zero router: the
    paper's start) to `out`; returns its parameter count."""
    import torch
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM

    cfg = H3FusionConfig(**SHAPES[shape], num_experts=3, num_experts_per_tok=2, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = H3FusionForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.zero_()
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def synthetic_rows(vocab: int, num_rows: int, seq_len: int, seed: int,
                   num_tasks: int = 3) -> list[dict]:
    """Pre-tokenized SFT rows (input_ids, attention_mask, labels, task_label); task t draws its
    tokens from its own id range, the prompt part is masked out of the labels."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    span = (vocab - 8) // num_tasks
    rows = []
    for i in range(num_rows):
        task = i % num_tasks
        lo = 8 + task * span
        ids = torch.randint(lo, lo + min(span, 256), (seq_len - 1,), generator=gen).tolist() + [2]
        n_prompt = seq_len // 4
        rows.append({"input_ids": ids, "attention_mask": [1] * seq_len,
                     "labels": [-100] * n_prompt + ids[n_prompt:],
                     "task_label": [1.0 if k == task else 0.0 for k in range(num_tasks)]})
    return rows


def fusion_config(args):
    from pipeline.config import load_config
    return load_config("tiny", [
        f"fusion.ds_config={ZERO2}", f"fusion.train.micro_batch_size={args.micro_batch}",
        "fusion.train.grad_accum_steps=1", f"fusion.train.max_steps={args.steps}",
        "fusion.train.epochs=100", f"fusion.train.max_seq_len={args.seq_len}",
        f"fusion.train.lr={args.lr}", "fusion.train.warmup_steps=0", "fusion.train.log_every=0",
        "fusion.train.save_every=0", f"fusion.train.seed={args.seed}", "fusion.ep_degree=1",
        "fusion.top_k=2", "fusion.trainable=router+experts", "fusion.lambda_gate=1.0",
        "fusion.gate_tokens=all", f"fusion.moe_backend={args.moe_backend}",
        "fusion.gamma.helpful=0.0", "fusion.gamma.harmless=0.0", "fusion.gamma.honest=0.0"])


def verdict(losses: list[float], steps: int) -> dict:
    """Pass/fail of a loss curve: all `steps` steps ran, every loss finite, and the mean of the
    last WINDOW steps below the mean of the first WINDOW."""
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    first = sum(losses[:WINDOW]) / WINDOW if len(losses) >= WINDOW else float("nan")
    last = sum(losses[-WINDOW:]) / WINDOW if len(losses) >= WINDOW else float("nan")
    decreasing = finite and len(losses) >= 2 * WINDOW and last < first
    return {"steps_run": len(losses), "finite": finite, f"first{WINDOW}_mean": first,
            f"last{WINDOW}_mean": last, "decreasing": decreasing,
            "ok": finite and decreasing and len(losses) == steps}



def train(args, work: Path) -> dict:
    """Build the model, run fusion, return the report (without the verdict's pass/fail)."""
    import torch
    from pipeline.layout import RunLayout
    from pipeline.train.fusion.stage import FusionPaths, train_fusion

    t0 = time.time()
    init = work / "fused_init"
    num_params = build_init(init, args.shape, args.seed)
    rows = synthetic_rows(SHAPES[args.shape]["vocab_size"], 3 * 64, args.seq_len, args.seed)
    build_s = time.time() - t0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")      # one process: a private port
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    seen: dict = {"step_end_s": []}

    def record(step, loop):
        seen["step_end_s"].append(time.time())
        seen["history"] = [dict(r) for r in loop.history]
        if step == 1:
            params = list(loop.engine.module.parameters())
            seen["param_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params})
            seen["param_devices"] = sorted({p.device.type for p in params})

    t1 = time.time()
    error = None
    try:
        rc = train_fusion(fusion_config(args), FusionPaths.for_run(RunLayout.at(work / "run"), str(init)),
                          rows=rows, overwrite=True, on_step_end=record)
    except Exception as exc:   # recorded in the report: the check reads it
        rc, error = None, f"{type(exc).__name__}: {exc}"
    ends = seen["step_end_s"]
    history = seen.get("history", [])
    return {
        "shape": args.shape, "random_init": True, "config": SHAPES[args.shape],
        "num_params": num_params, "moe_backend": args.moe_backend, "steps": args.steps,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "lr": args.lr,
        "train_fusion_rc": rc, "error": error,
        "loss_total": [h.get("loss/total") for h in history],
        "loss_ce": [h.get("loss/ce") for h in history],
        "loss_gate": [h.get("loss/gate") for h in history],
        "param_dtypes": seen.get("param_dtypes"), "param_devices": seen.get("param_devices"),
        "build_s": build_s, "train_s": time.time() - t1,
        # steady state: from the end of step 1 to the end of the last step
        "step_s": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None,
        "peak_gpu_mem_gb": (torch.cuda.max_memory_allocated() / 2**30
                            if torch.cuda.is_available() else None),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.work:
        report = train(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="h3f-fusion-smoke-") as tmp:
            report = train(args, Path(tmp))
    report.update(verdict([float(v) for v in report["loss_total"] if v is not None], args.steps))
    if args.require_cuda and (report["param_dtypes"] != ["bfloat16"]
                              or report["param_devices"] != ["cuda"]):
        report["ok"] = False
        report["error"] = report["error"] or (
            f"engine parameters are {report['param_dtypes']} on {report['param_devices']}, "
            f"not bf16 on cuda")
    report["ok"] = bool(report["ok"] and report["train_fusion_rc"] == 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_smoke.json").write_text(json.dumps(report, indent=1))
    print(f"fusion smoke ({args.shape}, random init, {report['num_params'] / 1e6:.1f}M params): "
          f"{report['steps_run']} steps, total loss first {WINDOW} mean "
          f"{report[f'first{WINDOW}_mean']:.4f} -> last {WINDOW} mean "
          f"{report[f'last{WINDOW}_mean']:.4f}, params {report['param_dtypes']} on "
          f"{report['param_devices']}: {'PASS' if report['ok'] else 'FAIL'}"
          + (f" ({report['error']})" if report["error"] else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the fusion dist tests (no tests here): a tiny fused MoE with distinct experts,
synthetic task-separable rows, and a 2-process gloo runner that executes several fusion jobs
inside one process group (DeepSpeed start-up on CPU is slow, so runs are batched)."""
from __future__ import annotations

import json
import logging
import os
import signal
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipeline.env import free_port

REPO = Path(__file__).resolve().parents[2]
ZERO2 = str(REPO / "ds_configs" / "zero2_fusion_ep.json")
VOCAB = 160



def build_tiny_fused(out: Path, num_experts: int = 3, names=None, seed: int = 0) -> Path:
    """A random tiny H3Fusion MoE (experts differ: independent random init); zero router."""
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM

    cfg = H3FusionConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         num_experts=num_experts, top_k=min(2, num_experts), expert_names=names,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = H3FusionForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.zero_()   # the paper's router init: every expert equally likely
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_rows(num_tasks: int, per_task: int = 24, seed: int = 0) -> list[dict]:
    """Task t's prompts and responses use their own token range, so routing can separate tasks."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(per_task):
        for t in range(num_tasks):
            lo = 8 + t * 48
            n_prompt = 4 + int(torch.randint(0, 4, (1,), generator=gen))
            ids = torch.randint(lo, lo + 48, (n_prompt + 6,), generator=gen).tolist() + [2]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * n_prompt + ids[n_prompt:],
                         "task_label": [1.0 if k == t else 0.0 for k in range(num_tasks)]})
    return rows


def fusion_config(overrides: list[str]):
    from pipeline.config import load_config
    base = [f"fusion.ds_config={ZERO2}", "fusion.train.micro_batch_size=4", "fusion.train.max_steps=8",
            "fusion.train.log_every=1", "fusion.train.lr=0.05", "fusion.train.warmup_steps=0",
            "fusion.ep_degree=1", "fusion.lambda_gate=1.0",
            # pinned, not inherited from the tiny preset (which is tuned for the demo and changes)
            "fusion.trainable=router", "fusion.gate_tokens=all", "fusion.gamma.helpful=0.0",
            "fusion.gamma.harmless=0.0", "fusion.gamma.honest=0.0"]
    return load_config("tiny", base + list(overrides))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _hook(spec: dict | None, rank: int):
    """Test hook run after every optimizer step: kill, signal or poison at a chosen step."""
    if not spec:
        return None

    def on_step_end(step, loop):
        if step != spec["step"] or rank not in spec.get("ranks", [0, 1]):
            return
        if spec["kind"] == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif spec["kind"] == "sigusr1":
            os.kill(os.getpid(), signal.SIGUSR1)
        elif spec["kind"] == "nan":
            with torch.no_grad():
                next(p for n, p in loop.engine.module.named_parameters()
                     if n.endswith("router.weight")).fill_(float("nan"))
    return on_step_end


def _run_job(job: dict, rank: int) -> dict:
    from pipeline.layout import RunLayout
    from pipeline.train.fusion.stage import FusionPaths, train_fusion

    cfg = fusion_config(job["overrides"])
    run = RunLayout.at(job["run"])
    paths = FusionPaths.for_run(run, job["init"])
    rows = json.loads(Path(job["rows"]).read_text())
    seen = {}

    def record(step, loop):
        seen["history"] = [{k: v for k, v in r.items()} for r in loop.history]
        seen.setdefault("grad_norms", []).append(loop.engine.grad_norm())   # after DS's reduction
        if _hook(job.get("hook"), rank):
            _hook(job.get("hook"), rank)(step, loop)

    handler = _Collect()
    logging.getLogger("h3fusion.fuse").addHandler(handler)
    try:
        rc = train_fusion(cfg, paths, rows=rows, overwrite=True, resume=job.get("resume", False),
                          on_step_end=record)
        result = {"rc": rc}
    except Exception as exc:  # recorded for the parent's assertions
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        logging.getLogger("h3fusion.fuse").removeHandler(handler)
    result.update(history=seen.get("history", []), grad_norms=seen.get("grad_norms", []),
                  warnings=handler.messages)
    return result


def _worker(rank: int, world: int, port: int, jobs: list[dict], result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    exit_code = 0
    for job in jobs:
        result = _run_job(job, rank)
        Path(result_dir, f"{job['name']}.rank{rank}.json").write_text(json.dumps(result))
        exit_code = result.get("rc", 0) or exit_code
    os._exit(exit_code)   # skip interpreter teardown of DeepSpeed/gloo state (slow, noisy)


def run_jobs(jobs: list[dict], result_dir: Path, world: int = 2, timeout: float = 900) -> list[int]:
    """Run `jobs` in order inside one `world`-process gloo group; return the exit codes."""
    result_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, jobs, str(result_dir)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():   # a peer died (e.g. SIGKILL) and this one waits in a collective
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def result(result_dir: Path, name: str, rank: int = 0) -> dict:
    path = result_dir / f"{name}.rank{rank}.json"
    assert path.is_file(), f"job {name} left no result on rank {rank}"
    return json.loads(path.read_text())


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out

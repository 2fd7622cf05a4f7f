#!/usr/bin/env python
"""Peak host memory of stage 1 (expert) and stage 2 (fusion) on CPU, per rank, next to what
`h3fusion plan` predicts for the same shape (docs/performance.md, "Memory plan vs measured").

For each preset and stage: random weights at the preset's real model shape are saved once (the
base for stage 1, an H3Fusion MoE for stage 2; tiny: `base.tiny` + `tokenizer.vocab_size`,
SmolLM2: transformers' own reading of the GGUF's config, not the planner's), then `--world`
real processes (gloo, fp32) build the stage exactly as the pipeline does (stage 1:
`train.expert.build_model` + `deepspeed_engine.build_engine`; stage 2: `FusionLoop.setup`),
run `--steps` optimizer steps of the stage's own loss on full-length synthetic micro batches
(`micro_batch_size` x `max_seq_len` tokens, one padded position) and consolidate the model as
the stage does at its end (stage 1: `consolidated_state_dict`; stage 2: `save_consolidated`).

Measured per rank: the exact peak resident memory of each phase (the kernel's VmHWM, reset at
every phase start through /proc/self/clear_refs). Resident pages include the file pages of
memory-mapped checkpoints: an fp32 checkpoint loaded in fp32 is mapped, not copied (transformers
5, pipeline/model/loading.py), so there its parameters are file pages. Before measuring, each
rank runs the same stage code on a micro model for one step and frees it (`warm_up`): imports,
lazily built DeepSpeed ops and first-use buffers then sit in the `baseline`, the resident size
after it (Python, torch, transformers, DeepSpeed, gloo: a constant the plan does not model).
The ratio is (peak - baseline) / the plan's per-rank bytes in "host = device" mode
(pipeline.memory_plan: fp32, no GPU reserve, no runtime allowance). The ranks run with glibc's
MALLOC_MMAP_THRESHOLD_ fixed (`--mmap-threshold`, 64 KiB): with glibc's default dynamic
threshold freed activations stay in the heap and the peak grows step by step (docs/performance.md
has that run too); the plan predicts live memory, not allocator retention.

    python tools/profiling/plan_vs_measured.py --presets tiny smollm2-135m --steps 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # runnable from a checkout

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pipeline.env import free_port  # noqa: E402

MIB = 2 ** 20
SETUP = {"expert": ("load", "engine"), "fusion": ("setup",)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "smollm2-135m"])
    p.add_argument("--stages", nargs="+", choices=("expert", "fusion"), default=["expert", "fusion"])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per measurement")
    p.add_argument("--world", type=int, default=2, help="ranks (gloo, CPU)")
    p.add_argument("--load-path", default="streamed", choices=("streamed", "fp32-per-rank"),
                   help="the plan's stage-2 load path: the code measured (streamed = the working "
                        "tree's pipeline/model/loading.py; fp32-per-rank = commit 7bbbd3f)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--mmap-threshold", type=int, default=65536,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks (bytes; 0 = glibc's dynamic "
                        "default, which keeps freed activations in the heap and grows step by step)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.world < 1:
        p.error("--steps and --world must be >= 1")
    return args


# ----------------------------------------------------------------------------- memory sampling

def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Phases:
    """Exact peak resident memory (VmHWM, all resident pages) of consecutive phases: the kernel's
    high-water mark, reset to the current size at each phase start (/proc/self/clear_refs)."""

    def __init__(self):
        self.peaks: dict = {}
        self.phase = None
        self.enter("baseline")

    def enter(self, phase: str) -> None:
        self._close()
        Path("/proc/self/clear_refs").write_text("5")
        self.phase = phase

    def _close(self) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = _status()["VmHWM"]

    def stop(self) -> dict:
        self._close()
        self.phase = None
        return dict(self.peaks)


# ----------------------------------------------------------------------------- models and data

def model_fields(cfg) -> dict:
    """The base shape, read independently of the planner (transformers' GGUF reader)."""
    if cfg.base.gguf:
        from transformers import AutoConfig

        from pipeline.checkpoint.gguf import resolve_gguf
        path = resolve_gguf(cfg.base.gguf)
        c = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    elif cfg.base.path:
        raise SystemExit("plan_vs_measured: presets with base.path are not measured here (weights)")
    else:
        t = cfg.base.tiny
        c = dict(vars(t), vocab_size=cfg.tokenizer.vocab_size, tie_word_embeddings=False)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
            "rms_norm_eps")
    return {k: c[k] for k in keys if k in c}


MICRO = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)


def save_random_model(cfg, stage: str, fields: dict, out: Path) -> None:
    """Random fp32 weights at the stage's model shape, saved as the stage would read them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model import H3FusionConfig, H3FusionForCausalLM
    torch.manual_seed(0)
    if stage == "expert":
        model = LlamaForCausalLM(LlamaConfig(**fields, pad_token_id=0))
    else:
        model = H3FusionForCausalLM(H3FusionConfig(
            **fields, pad_token_id=0, num_experts=len(cfg.dimensions),
            num_experts_per_tok=cfg.fusion.top_k, expert_names=list(cfg.dimensions)))
    model.save_pretrained(str(out))


def synthetic_rows(n: int, seq: int, vocab: int, num_experts: int) -> list[dict]:
    """Full-length rows (prompt half masked out of the loss); row 0 has one padded position so
    the batch carries a padding mask, as real batches do."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
        mask = [1] * seq if i else [1] * (seq - 1) + [0]
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": [-100] * (seq // 2) + ids[seq // 2:],
                     "task_label": [float(e == i % num_experts) for e in range(num_experts)]})
    return rows


# ----------------------------------------------------------------------------- one rank

def train_steps(task, engine, steps: int, accum: int, phases) -> None:
    """The shared loop's micro step (train/loop.py): loss, backward, step, then observe; one
    phase per optimizer step (`train0`, `train1`, ...)."""
    for step in range(steps):
        phases.enter(f"train{step}")
        for micro in range(accum):
            batch = task.batch(step, micro)
            loss, terms = task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            task.observe(batch, terms)


def run_expert(cfg, model_dir: Path, tmp: Path, rank: int, world: int, phases: Phases,
               steps: int, rows: list[dict]) -> None:
    from pipeline.backends import deepspeed_engine as dse
    from pipeline.data.collate import SFTCollator
    from pipeline.train.common import BatchSchedule
    from pipeline.train.expert.stage import ExpertJob, ExpertTask, build_model
    t = cfg.expert.train
    ds = dse.resolve_ds_config(dse.load_ds_config(cfg.expert.ds_config, require_stage=3), dse.DsTrainSettings(
        t.micro_batch_size, t.grad_accum_steps, t.grad_clip, t.lr, t.weight_decay, world))
    job = ExpertJob(cfg, cfg.dimensions[0], model_dir, tmp, tmp / "out", tmp / "ds", tmp / "tb", ds,
                    False, world, rank)
    schedule = BatchSchedule(len(rows), t.micro_batch_size, t.grad_accum_steps, world, t.seed)
    task = ExpertTask(job, rows, SFTCollator(0, max_len=t.max_seq_len), schedule)
    phases.enter("load")
    model = build_model(job)
    phases.enter("engine")
    engine = dse.build_engine(model, ds, [p for p in model.parameters() if p.requires_grad],
                              lr=t.lr, weight_decay=t.weight_decay)
    train_steps(task, engine, steps, t.grad_accum_steps, phases)
    phases.enter("save")
    dse.consolidated_state_dict(engine)


def run_fusion(cfg, model_dir: Path, tmp: Path, rank: int, world: int, phases: Phases,
               steps: int, rows: list[dict]) -> None:
    from pipeline.backends.deepspeed_engine import load_ds_config
    from pipeline.train.fusion.stage import FusionPaths, save_consolidated
    from pipeline.train.fusion.data import MicroBatches
    from pipeline.train.fusion.loop import FusionLoop
    t = cfg.fusion.train
    paths = FusionPaths(model_dir, tmp / "fused", tmp / "fused_ds", tmp / "tb")
    loop = FusionLoop(cfg, paths, load_ds_config(cfg.fusion.ds_config, require_stage=None),
                      MicroBatches(rows, t, rank, world, model_dir))
    phases.enter("setup")
    loop.setup(resume_if_present=False)
    train_steps(loop.loop.task, loop.engine, steps, t.grad_accum_steps, phases)
    phases.enter("save")
    save_consolidated(loop, paths.out, cfg, loop.summary())
    loop.close()


class NoPhases:
    def enter(self, phase: str) -> None:
        pass


def warm_up(run, cfg, job: dict, tmp: Path, rank: int, world: int, rows: list[dict]) -> None:
    """The same stage code on a micro model for one step, then freed: imports, lazily built
    DeepSpeed ops, thread pools and kernels' first-use allocations land in the baseline."""
    import gc
    run(cfg, Path(job["micro_dir"]), tmp, rank, world, NoPhases(), 1, rows)
    gc.collect()
    torch.distributed.barrier()


def worker(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    from pipeline.backends import deepspeed_engine as dse
    from pipeline.config import load_config
    from pipeline.env import DistEnv, export_dist_env
    export_dist_env(DistEnv(rank, world, rank, "127.0.0.1", port))
    dse.init_distributed()
    cfg = load_config(job["preset"], job["overrides"])
    rows = synthetic_rows(job["rows"], job["seq"], job["vocab"], len(cfg.dimensions))
    run = run_expert if job["stage"] == "expert" else run_fusion
    warm_up(run, cfg, job, Path(out_dir) / f"warm{rank}", rank, world, rows)
    phases = Phases()
    run(cfg, Path(job["model_dir"]), Path(out_dir) / f"work{rank}", rank, world, phases,
        job["steps"], rows)
    peaks = phases.stop()
    report = {"rank": rank, "peaks": peaks, "vm_hwm": max(peaks.values())}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- parent


def measure(preset: str, stage: str, args) -> tuple[list[dict], dict]:
    """(per-rank reports, the plan's rank phases) of one stage of one preset."""
    from pipeline.config import load_config
    section = "expert" if stage == "expert" else "fusion"
    overrides = list(args.overrides) + [f"{section}.train.max_steps={args.steps}"]
    cfg = load_config(preset, overrides)
    t = getattr(cfg, section).train
    fields = model_fields(cfg)
    if args.mmap_threshold:   # read by glibc when the spawned ranks start
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    with tempfile.TemporaryDirectory(prefix="plan_vs_measured.") as tmp:
        save_random_model(cfg, stage, fields, Path(tmp, "model"))
        save_random_model(cfg, stage, {**fields, **MICRO}, Path(tmp, "micro"))
        job = {"preset": preset, "overrides": overrides, "stage": stage, "steps": args.steps,
               "model_dir": str(Path(tmp, "model")), "micro_dir": str(Path(tmp, "micro")),
               "seq": t.max_seq_len, "vocab": fields["vocab_size"],
               "rows": t.micro_batch_size * t.grad_accum_steps * args.world * args.steps}
        mp.spawn(worker, args=(args.world, free_port(), job, tmp), nprocs=args.world, join=True)
        reports = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    return reports, predict(cfg, stage, args)


def predict(cfg, stage: str, args) -> dict:
    """The plan's per-rank bytes on CPU: fp32, host = device, no reserve, no runtime allowance."""
    from pipeline.memory_plan import FP32, LOAD_PATHS, PlanSettings, base_spec, model_shape, stage_plan, stage_runs
    spec = base_spec(cfg)
    run = {r.model.stage: r for r in stage_runs(cfg, spec)}[stage]
    settings = PlanSettings(1, args.world, precision=FP32, load_path=LOAD_PATHS[args.load_path],
                            host_runtime_gb=0.0, gpu_reserve_gb=0.0, host_is_device=True)
    plan = stage_plan(run, model_shape(cfg, spec), settings)
    return {**plan["rank_phases"], "device": plan["device"], "origin": spec.origin}


def rows_for(preset: str, stage: str, reports: list[dict], pred: dict) -> list[dict]:
    """One row per rank: baseline, measured peaks above it, predicted, ratios."""
    out = []
    for r in reports:
        peaks = dict(r["peaks"])
        base = peaks.pop("baseline")
        above = {k: v - base for k, v in peaks.items()}
        train = [v for k, v in above.items() if k.startswith("train")]
        setup = max(above[k] for k in SETUP[stage])
        measured, predicted = max(setup, *train), max(pred["load"], pred["train"])
        save_pred = pred["save_rank0"] if r["rank"] == 0 else sum(
            pred["device"][k] for k in ("params", "optimizer", "gathered", "snapshot"))
        out.append({"preset": preset, "stage": stage, "rank": r["rank"], "baseline": base,
                    "setup": setup, "train": max(train), "train_first": train[0], "train_last": train[-1],
                    "measured": measured, "predicted": predicted, "ratio": measured / predicted,
                    "predicted_load": pred["load"], "predicted_train": pred["train"],
                    "save_measured": above["save"], "save_predicted": save_pred,
                    "save_ratio": above["save"] / save_pred, "vm_hwm": r["vm_hwm"],
                    "phases": above})
    return out


def format_table(rows: list[dict]) -> str:
    head = (f"{'preset':<13} {'stage':<7} {'rank':>4} {'baseline':>8} {'setup':>7} {'train':>7} "
            f"{'1st/last':>11} {'peak':>7} {'plan':>7} {'ratio':>6} {'save':>7} {'plan':>7} "
            f"{'ratio':>6} {'VmHWM':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = {k: r[k] / MIB for k in ("baseline", "setup", "train", "train_first", "train_last", "measured",
                                      "predicted", "save_measured", "save_predicted", "vm_hwm")}
        first_last = f"{m['train_first']:.0f}/{m['train_last']:.0f}"
        lines.append(f"{r['preset']:<13} {r['stage']:<7} {r['rank']:>4} {m['baseline']:>8.0f} "
                     f"{m['setup']:>7.0f} {m['train']:>7.0f} {first_last:>11} {m['measured']:>7.0f} "
                     f"{m['predicted']:>7.0f} {r['ratio']:>6.2f} {m['save_measured']:>7.0f} "
                     f"{m['save_predicted']:>7.0f} {r['save_ratio']:>6.2f} {m['vm_hwm']:>7.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for preset in args.presets:
        for stage in args.stages:
            reports, pred = measure(preset, stage, args)
            rows += rows_for(preset, stage, reports, pred)
            print(f"{preset} {stage}: base from {pred['origin']}", flush=True)
    print(f"MiB per rank; world {args.world}, {args.steps} steps, fp32 CPU, MALLOC_MMAP_THRESHOLD_="
          f"{args.mmap_threshold or 'glibc default'}; setup, train (max over steps; 1st/last step), "
          f"peak (of setup and train) and save: peak resident memory (VmHWM) above the baseline; "
          f"plan: max(load, train) and the save phase of `h3fusion plan` (host = device); VmHWM: "
          f"the whole run's peak, baseline included")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

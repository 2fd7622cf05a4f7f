"""`h3fusion train-expert`: stage 1, fine-tune one HHH expert from the base under DeepSpeed ZeRO-3.

Run it under `torchrun` / the `deepspeed` launcher / `srun` with any number of processes; rank and
world come from `pipeline.env`. Every input is checked before a process group exists.

    <run>/base + <run>/data/sft/<dim>/train  ->  <run>/experts/<dim>     (consolidated HF model)
                                                  <run>/experts_ds/<dim>  (DeepSpeed checkpoints)
                                                  <run>/tensorboard/expert_<dim>

Methods: `ffn` trains every MLP weight (gate/up/down) with the rest frozen; `lora` trains PEFT
LoRA adapters on `expert.lora.target_modules` and writes the merged model plus `adapter/`.
A rerun continues from the latest DeepSpeed checkpoint when there is one (`--resume` insists).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import add_config_arguments, config_from_args
from ..config import TASKS, PipelineConfig, to_dict
from ..env import dist_env, requeue_requested_exit_code
from ..layout import RunLayout
from .common import (BatchSchedule, RankZeroLog, Throughput, all_reduce_sum, restore_rng_state,
                     rng_state, seed_everything, warmup_cosine_schedule)

FFN_MARKER = ".mlp."          # Llama MLP parameters: model.layers.{l}.mlp.{gate,up,down}_proj.weight
LORA_META = "lora.json"       # r/alpha/... beside the DS checkpoints (read by zero_to_hf)
_RESUME_IGNORED = ("log_every", "save_every")   # may change between a run and its resume


@dataclass
class ExpertJob:
    """Everything a run needs, validated before any process group is created."""
    cfg: PipelineConfig
    dimension: str
    base: Path
    data: Path
    out: Path
    ds_dir: Path
    tb_dir: Path
    ds_config: dict
    resume: bool
    world_size: int
    rank: int


def check_dimension(dimension: str) -> str:
    if dimension not in TASKS:
        raise ValueError(f"unknown dimension {dimension!r} (choose one of {list(TASKS)})")
    return dimension


def _check_inputs(layout: RunLayout, dimension: str) -> None:
    from ..base import check_llama_dir

    if not layout.base.is_dir():
        raise FileNotFoundError(f"base model dir not found: {layout.base} (run `h3fusion base`)")
    check_llama_dir(layout.base)
    train_dir = layout.data / "sft" / dimension / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"training data not found: {train_dir} (run `h3fusion data`)")


def prepare_job(cfg: PipelineConfig, run_dir: str | Path, dimension: str, resume: bool = False,
                overwrite: bool = False) -> ExpertJob:
    """Validate dimension, inputs, outputs and the DS JSON (incl. batch arithmetic)."""
    from ..backends.deepspeed_engine import DsTrainSettings, latest_tag, load_ds_config, resolve_ds_config

    check_dimension(dimension)
    layout, env, t = RunLayout.at(run_dir), dist_env(), cfg.expert.train
    _check_inputs(layout, dimension)
    out, ds_dir = layout.expert(dimension), layout.expert_ds(dimension)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite to replace it)")
    if resume and latest_tag(ds_dir) is None:
        raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {ds_dir} (no 'latest' file)")
    ds = resolve_ds_config(load_ds_config(cfg.expert.ds_config, require_stage=3), DsTrainSettings(
        t.micro_batch_size, t.grad_accum_steps, t.grad_clip, t.lr, t.weight_decay, env.world_size))
    return ExpertJob(cfg, dimension, layout.base, layout.data, out, ds_dir,
                     layout.tensorboard / f"expert_{dimension}", ds, resume, env.world_size, env.rank)


def load_train_rows(job: ExpertJob, tokenizer) -> list[dict]:
    from ..data.loading import load_sft
    from ..data.template import tokenize_sft

    ds = load_sft(job.data, job.dimension, "train")
    max_len = job.cfg.expert.train.max_seq_len
    # keep_in_memory: no cache files written into <run>/data (shared, and ranks would race)
    tokenized = ds.map(lambda b: tokenize_sft(b, tokenizer, max_len), batched=True,
                       remove_columns=ds.column_names, keep_in_memory=True)
    return tokenized.to_list()


def mark_ffn_trainable(model: torch.nn.Module) -> int:
    """Only MLP weights train; returns how many tensors are trainable."""
    n = 0
    for name, param in model.named_parameters():
        param.requires_grad = FFN_MARKER in name
        n += param.requires_grad
    if n == 0:
        raise ValueError(f"no parameter name contains {FFN_MARKER!r}: not a Llama-style model")
    return n


def build_model(job: ExpertJob):
    """The base, built already partitioned (ZeRO-3 zero.Init), with the method's trainable set."""
    from transformers import AutoModelForCausalLM

    from ..backends.deepspeed_engine import zero3_init_context

    dtype = torch.bfloat16 if job.ds_config["bf16"]["enabled"] else torch.float32
    with zero3_init_context(job.ds_config):
        model = AutoModelForCausalLM.from_pretrained(str(job.base), dtype=dtype)
    if job.cfg.expert.method == "ffn":
        mark_ffn_trainable(model)
        return model
    from peft import LoraConfig, get_peft_model

    lora = job.cfg.expert.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                            lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules),
                                            task_type="CAUSAL_LM"))


def _resume_config(cfg: PipelineConfig) -> dict:
    saved = to_dict(cfg.expert)
    saved["train"] = {k: v for k, v in saved["train"].items() if k not in _RESUME_IGNORED}
    return saved


class ExpertTrainer:
    """The ZeRO-3 engine plus the loop state that a checkpoint must restore."""

    def __init__(self, job: ExpertJob):
        from transformers import AutoTokenizer

        from ..backends import deepspeed_engine as dse
        from ..data.collate import SFTCollator

        self.job, self.dse, t = job, dse, job.cfg.expert.train
        dse.init_distributed()
        seed_everything(t.seed)  # same LoRA init on every rank
        tokenizer = AutoTokenizer.from_pretrained(str(job.base))
        self.rows = load_train_rows(job, tokenizer)
        self.collate = SFTCollator(tokenizer.pad_token_id, max_len=t.max_seq_len)
        self.schedule = BatchSchedule(len(self.rows), t.micro_batch_size, t.grad_accum_steps,
                                      job.world_size, t.seed)
        self.schedule.check(f"{job.data}/sft/{job.dimension}/train")
        self.total_steps = self.schedule.total_steps(t)
        model = build_model(job)
        self.engine = dse.build_engine(
            model, job.ds_config, [p for p in model.parameters() if p.requires_grad], lr=t.lr,
            weight_decay=t.weight_decay,
            scheduler_factory=warmup_cosine_schedule(t.warmup_steps, self.total_steps))
        self.step, self.history, self.resumed_from, self.train_s = 0, [], None, 0.0

    def maybe_resume(self) -> None:
        if self.dse.latest_tag(self.job.ds_dir) is None:
            return
        tag, client, rank_state = self.dse.load_checkpoint(self.engine, self.job.ds_dir)
        if client.get("expert_config") != _resume_config(self.job.cfg):
            raise ValueError(f"{self.job.ds_dir}/{tag} was trained with a different expert config "
                             f"than now; delete {self.job.ds_dir} to start over")
        self.step, self.history = int(client["step"]), list(client["history"])
        self.train_s = float(client.get("train_s", 0.0))
        restore_rng_state(rank_state)
        self.resumed_from = tag

    def checkpoint(self) -> None:
        client = {"step": self.step, "history": self.history, "train_s": self.train_s,
                  "expert_config": _resume_config(self.job.cfg), "dimension": self.job.dimension}
        self.dse.save_checkpoint(self.engine, self.job.ds_dir, f"step{self.step:07d}", client,
                                 rank_state=rng_state())

    def micro_step(self, micro: int, meter: Throughput) -> float:
        idx = self.schedule.indices(self.step, micro, self.job.rank)
        batch = self.collate([self.rows[i] for i in idx])
        out = self.engine(input_ids=batch["input_ids"].to(self.engine.device),
                          attention_mask=batch["attention_mask"].to(self.engine.device),
                          labels=batch["labels"].to(self.engine.device))
        self.engine.backward(out.loss)
        self.engine.step()
        meter.add(batch["attention_mask"])
        return float(out.loss.detach())

    def run(self, stop) -> str:
        """Train to `total_steps`; returns "done" or "stopped" (signal: checkpoint saved)."""
        from .signals import any_rank_requested

        t = self.job.cfg.expert.train
        log = RankZeroLog(self.job.tb_dir, self.total_steps, self.step, self.job.rank == 0,
                          desc=f"expert {self.job.dimension}")
        meter, window = Throughput(), []
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss = sum(self.micro_step(m, meter) for m in range(t.grad_accum_steps))
                self.step += 1
                self.train_s += time.perf_counter() - t0
                window.append(loss / t.grad_accum_steps)
                log.advance()
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self._log(log, window, meter)
                    window = []
                if any_rank_requested(stop.requested, all_reduce_sum):
                    self.checkpoint()
                    return "stopped"
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.checkpoint()
        finally:
            log.close()
        self.checkpoint()
        return "done"

    def _log(self, log: RankZeroLog, window: list[float], meter: Throughput) -> None:
        world = self.job.world_size
        loss = all_reduce_sum(sum(window) / len(window)) / world
        grad_norm = self.engine.get_global_grad_norm()
        values = {"train/loss": loss, "train/lr": self.engine.get_lr()[0],
                  "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "train/tokens_per_s": meter.rate(all_reduce_sum)}
        self.history.append({"step": self.step, **values})
        log.scalars(self.step, values)

    def save_output(self, wall_s: float) -> None:
        """All ranks call (gathers are collective); rank 0 writes <run>/experts/<dim>."""
        from ..surgery.lora import lora_scale, merge_lora_state_dict, split_peft_state_dict
        from ..surgery.zero_to_hf import save_hf_model

        state = self.dse.consolidated_state_dict(self.engine)
        partitions = [None] * self.job.world_size
        torch.distributed.all_gather_object(partitions, self.dse.partition_report(self.engine))
        if state is not None:
            manifest = self._manifest(wall_s, partitions)
            adapter = None
            if self.job.cfg.expert.method == "lora":
                lora = self.job.cfg.expert.lora
                state, tensors = split_peft_state_dict(state)
                state = merge_lora_state_dict(state, tensors, lora_scale(lora.r, lora.alpha))
                adapter = {"tensors": tensors, **lora_meta(self.job)}
            save_hf_model(state, self.job.base, self.job.out, overwrite=True, manifest=manifest,
                          adapter=adapter)
        torch.distributed.barrier()

    def _manifest(self, wall_s: float, partitions: list) -> dict:
        t = self.job.cfg.expert.train
        last = self.history[-1] if self.history else {}
        return {"stage": "expert", "dimension": self.job.dimension,
                "method": self.job.cfg.expert.method, "base": str(self.job.base),
                "steps": self.step, "total_steps": self.total_steps,
                "final_loss": last.get("train/loss"), "history": self.history,
                "train_s": round(self.train_s, 3), "wall_s": round(wall_s, 3),
                "world_size": self.job.world_size, "train_rows": len(self.rows),
                "global_batch": t.micro_batch_size * t.grad_accum_steps * self.job.world_size,
                "resumed_from": self.resumed_from, "ds_checkpoints": str(self.job.ds_dir),
                "zero3_partitions": partitions, "ds_config": self.job.ds_config,
                "expert_config": to_dict(self.job.cfg.expert)}


def lora_meta(job: ExpertJob) -> dict:
    lora = job.cfg.expert.lora
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": list(lora.target_modules)}


def train_expert(cfg: PipelineConfig, run_dir: str | Path, dimension: str, resume: bool = False,
                 overwrite: bool = False) -> int:
    """Returns 0 when done, or the requeue exit code after a stop signal (checkpoint saved)."""
    from .signals import install_stop_handlers

    t0 = time.time()
    job = prepare_job(cfg, run_dir, dimension, resume, overwrite)
    stop = install_stop_handlers()
    trainer = ExpertTrainer(job)
    if job.rank == 0 and cfg.expert.method == "lora":
        job.ds_dir.mkdir(parents=True, exist_ok=True)
        (job.ds_dir / LORA_META).write_text(json.dumps(lora_meta(job), indent=2))
    trainer.maybe_resume()
    status = trainer.run(stop)
    if status == "done":
        trainer.save_output(time.time() - t0)
    stop.uninstall()
    torch.distributed.destroy_process_group()
    return 0 if status == "done" else requeue_requested_exit_code()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dimension", required=True, help=f"which expert: one of {list(TASKS)}")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest DeepSpeed checkpoint (error if there is none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing expert output")


def main(args: argparse.Namespace) -> int:
    check_dimension(args.dimension)
    cfg = config_from_args(args, "expert")
    return train_expert(cfg, args.run_dir, args.dimension, args.resume, args.overwrite)

"""`h3fusion train-expert`: stage 1, fine-tune one HHH expert from the base under DeepSpeed ZeRO-3.

Run it under `torchrun` / the `deepspeed` launcher / `srun` with any number of processes; rank and
world come from `pipeline.env`. Every input is checked before a process group exists.

    <run>/base + <run>/data/sft/<dim>/train  ->  <run>/experts/<dim>     (consolidated HF model)
                                                  <run>/experts_ds/<dim>  (DeepSpeed checkpoints)
                                                  <run>/tensorboard/expert_<dim>

Methods: `ffn` trains every MLP weight (gate/up/down) with the rest frozen; `lora` trains PEFT
LoRA adapters on `expert.lora.target_modules` and writes the merged model plus `adapter/`.
A rerun continues from the latest DeepSpeed checkpoint when there is one (`--resume` insists).
The training baselines (pipeline.train.baselines.stage) run this same job with another data source
(the fusion mix), other init weights (a stage-1 expert) and their own outputs (`checked_job`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from ...config import PipelineConfig, check_dimension, to_dict
from ...env import dist_env, requeue_requested_exit_code
from ...io_utils import check_output_dir
from ...layout import RunLayout
from ..common import BatchSchedule, Throughput, seed_everything, sum_over_ranks, warmup_cosine
from ..grad_checkpointing import prepare_for_training
from ..inputs import check_model_weights, check_rows, check_writable, count_saved_rows
from ..loop import LoopSettings, TrainLoop, comparable_config
from ..mixed_precision import TrainPrecision

FFN_MARKER = ".mlp."          # Llama MLP parameters: model.layers.{l}.mlp.{gate,up,down}_proj.weight
LORA_META = "lora.json"       # r/alpha/... beside the DS checkpoints (read by zero_to_hf)
log = logging.getLogger(__name__)


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
    # the defaults are stage 1; the training baselines (pipeline.train.baselines.stage) set them
    init: Optional[Path] = None                # weights to start from (None: `base`)
    mix_weights: Optional[dict] = None         # None: sft/<dimension>/train; else the union:
    union_dims: tuple = ()                     # these sft/<d>/train + the fusion mix (step_plan.union_sft)
    mix_seed: int = 0                          # load_mixed_sft's seed (the mix's row subset)
    kind: str = "expert"                       # manifest "stage" and log/progress name
    manifest_extra: dict = field(default_factory=dict)
    # the setting cfg.expert.train.precision came from (the extra-steps baseline: fusion's)
    precision_key: str = "expert.train.precision"
    precision: Optional[TrainPrecision] = None  # resolved by `checked_job`

    @property
    def train_source(self) -> str:
        if self.mix_weights is None:
            return f"{self.data}/sft/{self.dimension}/train"
        return (f"{self.data}/sft/{{{','.join(self.union_dims)}}}/train + sft/*/train mixed by "
                f"{self.mix_weights}")


def check_inputs(layout: RunLayout, dimension: str) -> None:
    from ...checkpoint.gguf import check_llama_dir

    if not layout.base.is_dir():
        raise FileNotFoundError(f"base model dir not found: {layout.base} (run `h3fusion base`)")
    check_llama_dir(layout.base)
    check_model_weights(layout.base, "base model")
    train_dir = layout.data / "sft" / dimension / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"training data not found: {train_dir} (run `h3fusion data`)")


def prepare_job(cfg: PipelineConfig, run_dir: str | Path, dimension: str, resume: bool = False,
                overwrite: bool = False) -> ExpertJob:
    """Validate dimension, inputs (base weights, >= 1 step of train rows), outputs (writable),
    the checkpoint to resume from (docs/reliability.md) and the DS JSON (batch arithmetic)."""
    check_dimension(cfg, dimension)
    layout = RunLayout.at(run_dir)
    check_inputs(layout, dimension)
    return checked_job(cfg, layout, dimension, (layout.expert(dimension),
                       layout.expert_ds(dimension), layout.tensorboard / f"expert_{dimension}"),
                       lambda: count_saved_rows(layout.data / "sft" / dimension / "train"),
                       resume, overwrite)


def checked_job(cfg: PipelineConfig, layout: RunLayout, dimension: str,
                outputs: tuple[Path, Path, Path], count_rows: Callable[[], int], resume: bool,
                overwrite: bool, **extra) -> ExpertJob:
    """The output/resume/DS-config checks of `prepare_job` for (out, ds_dir, tb_dir) and
    `count_rows()` training rows; `extra` sets ExpertJob's baseline fields."""
    from ...backends.deepspeed_engine import DsTrainSettings, load_ds_config, resolve_ds_config
    from ...backends.ds_checkpoint_check import resume_tag

    from ...env import accelerator_kind

    env, t = dist_env(), cfg.expert.train
    out, ds_dir, tb_dir = outputs
    job = ExpertJob(cfg, dimension, layout.base, layout.data, out, ds_dir, tb_dir, {}, resume,
                    env.world_size, env.rank, **extra)
    # bf16 on a CPU without bf16 instructions: one error before anything else
    job.precision = TrainPrecision.resolve(job.precision_key, t.precision, accelerator_kind())
    check_output_dir(out, overwrite)
    check_rows(count_rows(), t.micro_batch_size * t.grad_accum_steps * env.world_size,
               job.train_source)
    out_name = "expert output" if job.kind == "expert" else f"{job.kind} output"
    for path, what in ((out, out_name), (ds_dir, "checkpoint dir"), (tb_dir, "TensorBoard dir")):
        check_writable(path, what)
    # a damaged newest checkpoint falls back (logged once); another world size is an error
    if resume_tag(ds_dir, env.world_size, announce=env.rank == 0) is None and resume:
        raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {ds_dir} (no 'latest' file)")
    # ZeRO-3 (ds_configs/zero3_expert.json, the default) or ZeRO-2 (zero2_expert.json: each rank
    # holds the whole model; faster at small scale, docs/performance.md section 7)
    job.ds_config = resolve_ds_config(load_ds_config(cfg.expert.ds_config, require_stage=(2, 3)),
                                      DsTrainSettings(t.micro_batch_size, t.grad_accum_steps,
                                                      t.grad_clip, t.lr, t.weight_decay,
                                                      env.world_size, job.precision.resolved))
    return job


def load_train_rows(job: ExpertJob, tokenizer) -> tuple[list[dict], list[str]]:
    """The tokenized training rows and each row's `task` (the dimension it comes from)."""
    from ...data.loading import load_sft
    from ...data.template import tokenize_sft
    from ..step_plan import union_sft

    if job.mix_weights is None:
        ds = load_sft(job.data, job.dimension, "train")
    else:
        ds = union_sft(job.data, list(job.union_dims), job.mix_weights, job.mix_seed)
    max_len = job.cfg.expert.train.max_seq_len
    # keep_in_memory: no cache files written into <run>/data (shared, and ranks would race)
    tokenized = ds.map(lambda b: tokenize_sft(b, tokenizer, max_len), batched=True,
                       remove_columns=ds.column_names, keep_in_memory=True)
    return tokenized.to_list(), list(ds["task"])


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
    """The base (or `job.init`), built already partitioned (ZeRO-3 zero.Init), in train mode,
    checkpointed when `train.gradient_checkpointing`, with the method's trainable set."""
    from transformers import AutoModelForCausalLM

    from ...backends.deepspeed_engine import zero3_init_context

    dtype = torch.bfloat16 if job.ds_config["bf16"]["enabled"] else torch.float32
    with zero3_init_context(job.ds_config):
        model = AutoModelForCausalLM.from_pretrained(str(job.init or job.base), dtype=dtype)
    # the baselines' job.cfg.expert.train is expert.train's (multitask) or fusion.train (extra steps)
    prepare_for_training(model, job.cfg.expert.train.gradient_checkpointing)
    if job.cfg.expert.method == "ffn":
        mark_ffn_trainable(model)
        return model
    from peft import LoraConfig, get_peft_model

    lora = job.cfg.expert.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                            lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules),
                                            task_type="CAUSAL_LM"))


class ExpertTask:
    """Stage 1's pieces for `loop.TrainLoop`: rows in `BatchSchedule` order, the causal-LM loss,
    and logging (a window mean of the loss, LR, grad norm and tokens/s every `log_every`)."""

    def __init__(self, job: ExpertJob, rows: list[dict], collate, schedule: BatchSchedule):
        self.job, self.rows, self.collate, self.schedule = job, rows, collate, schedule
        self.meter, self.window, self.train_s = Throughput(), [], 0.0

    def batch(self, step: int, micro: int) -> dict:
        idx = self.schedule.indices(step, micro, self.job.rank)
        return self.collate([self.rows[i] for i in idx])

    def loss(self, engine, batch: dict):
        out = engine(input_ids=batch["input_ids"].to(engine.device),
                     attention_mask=batch["attention_mask"].to(engine.device),
                     labels=batch["labels"].to(engine.device))
        return out.loss, {"ce": out.loss}

    def observe(self, batch: dict, terms: dict) -> None:
        self.meter.add(batch["attention_mask"])

    def end_step(self, loop: TrainLoop, micro_losses: list[float], step_s: float):
        self.train_s += step_s
        self.window.append(sum(micro_losses) / len(micro_losses))
        if not loop.is_log_step(self.job.cfg.expert.train.log_every):
            return None
        loss = sum_over_ranks(sum(self.window) / len(self.window)) / self.job.world_size
        grad_norm = loop.engine.grad_norm()
        values = {"train/loss": loss, "train/lr": loop.engine.lr(),
                  "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
                  "train/tokens_per_s": self.meter.rate(sum_over_ranks)}
        self.window = []
        loop.tb.scalars(loop.step, values)
        return {"step": loop.step, **values}

    def client_state(self) -> dict:
        return {"train_s": self.train_s, "dimension": self.job.dimension}

    def restore(self, client_state: dict) -> None:
        self.train_s = float(client_state.get("train_s", 0.0))


class ExpertTrainer:
    """The ZeRO-3 (or ZeRO-2) engine, stage 1's task and the shared training loop around them."""

    def __init__(self, job: ExpertJob, stop=None):
        from transformers import AutoTokenizer

        from ...backends import deepspeed_engine as dse
        from ...data.collate import SFTCollator

        self.job, self.dse, t = job, dse, job.cfg.expert.train
        dse.init_distributed()
        seed_everything(t.seed)  # same LoRA init on every rank
        tokenizer = AutoTokenizer.from_pretrained(str(job.base))
        rows, self.tasks = load_train_rows(job, tokenizer)
        schedule = BatchSchedule(len(rows), t.micro_batch_size, t.grad_accum_steps,
                                 job.world_size, t.seed)
        schedule.check(job.train_source)
        collate = SFTCollator(tokenizer.pad_token_id, max_len=t.max_seq_len)
        self.task = ExpertTask(job, rows, collate, schedule)
        total = schedule.total_steps(t)
        model = build_model(job)
        self.engine = dse.build_engine(
            model, job.ds_config, [p for p in model.parameters() if p.requires_grad], lr=t.lr,
            weight_decay=t.weight_decay,
            lr_multiplier=partial(warmup_cosine, total=total, warmup=t.warmup_steps),
            autocast=job.precision.autocast)
        settings = LoopSettings(
            total_steps=total, grad_accum_steps=t.grad_accum_steps, save_every=t.save_every,
            config_key="expert_config",
            config=comparable_config(to_dict(job.cfg.expert), job.precision.resolved),
            tb_dir=job.tb_dir, desc=f"{job.kind} {job.dimension}", rank0=job.rank == 0)
        self.loop = TrainLoop(self.engine, self.task, settings,
                              dse.DsCheckpoints(self.engine, job.ds_dir), stop)

    def save_output(self, wall_s: float) -> None:
        """All ranks call (gathers are collective); rank 0 writes <run>/experts/<dim>."""
        from ...checkpoint.lora import lora_scale, merge_lora_state_dict, split_peft_state_dict
        from ...checkpoint.hf_model import save_hf_model

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
        from ..step_plan import rows_seen

        t, loop = self.job.cfg.expert.train, self.loop
        last = loop.history[-1] if loop.history else {}
        return {"stage": self.job.kind, "dimension": self.job.dimension,
                "method": self.job.cfg.expert.method, "base": str(self.job.base),
                "steps": loop.step, "total_steps": loop.total_steps,
                "final_loss": last.get("train/loss"), "history": loop.history,
                "train_s": round(self.task.train_s, 3), "wall_s": round(wall_s, 3),
                "world_size": self.job.world_size, "train_rows": len(self.task.rows),
                "seen_by_dimension": rows_seen(self.tasks, t, self.job.world_size, loop.step),
                "global_batch": t.micro_batch_size * t.grad_accum_steps * self.job.world_size,
                "resumed_from": loop.resumed_from, "ds_checkpoints": str(self.job.ds_dir),
                "zero3_partitions": partitions, "ds_config": self.job.ds_config,
                "precision": self.job.precision.record(),
                "expert_config": to_dict(self.job.cfg.expert), **self.job.manifest_extra}


def lora_meta(job: ExpertJob) -> dict:
    lora = job.cfg.expert.lora
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": list(lora.target_modules)}


def train_expert(cfg: PipelineConfig, run_dir: str | Path, dimension: str, resume: bool = False,
                 overwrite: bool = False) -> int:
    """Returns 0 when done, or the requeue exit code after a stop signal (checkpoint saved)."""
    t0 = time.time()
    return run_job(prepare_job(cfg, run_dir, dimension, resume, overwrite), t0)


def run_job(job: ExpertJob, t0: float) -> int:
    """Train a prepared job to its last step and write its output (see `train_expert`)."""
    from ..signals import install_stop_handlers

    cfg, dimension = job.cfg, job.dimension
    stop = install_stop_handlers()
    trainer = ExpertTrainer(job, stop)
    if job.rank == 0 and cfg.expert.method == "lora":
        job.ds_dir.mkdir(parents=True, exist_ok=True)
        (job.ds_dir / LORA_META).write_text(json.dumps(lora_meta(job), indent=2))
    if trainer.loop.resume() is not None and job.rank == 0:
        log.warning("%s %s: resumed from %s/%s at step %d of %d", job.kind, dimension, job.ds_dir,
                    trainer.loop.resumed_from, trainer.loop.step, trainer.loop.total_steps)
    trainer.task.meter = Throughput()   # tokens/s from the first step, not from the set-up
    status = trainer.loop.run()
    if status == "done":
        trainer.save_output(time.time() - t0)
    elif job.rank == 0:
        log.warning("%s %s: stop signal %s: checkpoint %s/%s saved at step %d; exiting with "
                    "%d for requeue", job.kind, dimension, stop.name(), job.ds_dir,
                    trainer.loop.last_tag,
                    trainer.loop.step, requeue_requested_exit_code())
    stop.uninstall()
    torch.distributed.destroy_process_group()
    return 0 if status == "done" else requeue_requested_exit_code()

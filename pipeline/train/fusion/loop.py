"""Stage 2's pieces for the shared training loop (`loop.TrainLoop`): the MoE model and its
DeepSpeed engine, the fusion loss, routing statistics, collapse warnings and TensorBoard rows.

Every rank runs the same steps; the loop all-reduces the decisions that must agree (non-finite
loss, stop signal), and the per-step statistics are summed over ranks, so every rank holds the
same history.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ...config import PipelineConfig, to_dict
from ...env import dist_env
from . import metrics as fm
from ..common import reduce_over_ranks, seed_everything, warmup_cosine
from ..grad_checkpointing import prepare_for_training
from ..loop import LoopSettings, NonFiniteLossError, TrainLoop, comparable_config
from ..signals import install_stop_handlers

__all__ = ["FusionLoop", "FusionTask", "NonFiniteLossError", "expert_parallel_group"]

log = logging.getLogger("h3fusion.fuse")


def expert_parallel_group(ep_degree: int):
    """Consecutive ranks form an EP group; every rank creates every group (a collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, ep_degree):
        group = dist.new_group(list(range(start, start + ep_degree)))
        if start <= rank < start + ep_degree:
            mine = group
    return mine if ep_degree > 1 else None


class FusionTask:
    """Data, loss, statistics and logging of one fusion run (see `loop.StageTask`)."""

    def __init__(self, fcfg, batches, model_config, initial_experts: list):
        self.fcfg, self.batches, self.initial_experts = fcfg, batches, initial_experts
        self.num_experts = model_config.num_experts
        self.expert_names = list(model_config.expert_names)
        self.gamma_E = torch.tensor([fcfg.gamma.get(n, 0.0) for n in self.expert_names])
        self.collapse = fm.CollapseDetector(fcfg.collapse_threshold, fcfg.collapse_steps)
        self.engine, self.stats, self._last = None, {}, None

    def batch(self, step: int, micro: int) -> dict:
        return self.batches.get(step, micro)

    def loss(self, engine, batch: dict):
        """L_CE + lambda * L_gate (+ drift, load balance, z-loss); keeps the outputs for
        `observe`."""
        from . import losses

        batch = {k: v.to(engine.device) for k, v in batch.items()}
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"])
        probs = [r.probs_TE for r in out.router_outputs]
        mask, label = batch["attention_mask"], batch["task_label"]
        gate_mask = losses.gate_token_mask(mask, batch["labels"], self.fcfg.gate_tokens)
        terms = {"ce": out.loss, "gate": losses.gating_loss(probs, gate_mask, label)}
        total = terms["ce"] + self.fcfg.lambda_gate * terms["gate"]
        if self.initial_experts and bool((self.gamma_E > 0).any()):
            terms["drift"] = losses.drift_penalty(engine.module, self.initial_experts, self.gamma_E)
            total = total + terms["drift"]
        if self.fcfg.load_balance_coef > 0:
            terms["load_balance"] = losses.load_balance_loss(
                probs, [r.topk_idx_TK for r in out.router_outputs], mask)
            total = total + self.fcfg.load_balance_coef * terms["load_balance"]
        if self.fcfg.z_loss_coef > 0:
            terms["z_loss"] = losses.router_z_loss([r.logits_TE for r in out.router_outputs], mask)
            total = total + self.fcfg.z_loss_coef * terms["z_loss"]
        terms["total"] = total
        self._last = (out, batch)
        return total, terms

    def observe(self, batch: dict, terms: dict) -> None:
        """Add this micro step's loss terms and routing statistics to the step's sums."""
        out, batch = self._last
        self._last = None
        mask, label = batch["attention_mask"], batch["task_label"]
        probs = [r.probs_TE.detach() for r in out.router_outputs]
        topk = [r.topk_idx_TK for r in out.router_outputs]
        correct, total = fm.top1_routing_hits(probs, mask, label)
        vec = torch.cat([torch.tensor([float(v.detach()) for v in terms.values()] +
                                      [float(fm.routing_entropy(probs, mask)), float(mask.sum()), 1.0]),
                         correct, total, fm.top1_load(topk, mask, self.num_experts).cpu().reshape(-1)])
        self.stats["keys"] = list(terms)
        self.stats["vec"] = vec if "vec" not in self.stats else self.stats["vec"] + vec.double()

    def _reduce_stats(self) -> dict:
        """Sum the step's stats over ranks; return means and per-task accuracies."""
        vec = reduce_over_ranks(self.stats["vec"])
        keys, k, E = self.stats["keys"], len(self.stats["keys"]), self.num_experts
        self.stats = {}
        micro = vec[k + 2]
        row = {f"loss/{name}": float(vec[i] / micro) for i, name in enumerate(keys)}
        row["router/entropy"] = float(vec[k] / micro)
        row["tokens"] = float(vec[k + 1])
        correct, total = vec[k + 3:k + 3 + E], vec[k + 3 + E:k + 3 + 2 * E]
        for name, acc in fm.accuracy_by_name(correct, total, self.expert_names).items():
            row[f"routing_acc/{name}"] = acc
        row["load"] = (vec[k + 3 + 2 * E:] / micro).reshape(-1, E).tolist()
        return row

    def end_step(self, loop: TrainLoop, micro_losses: list[float], step_s: float) -> dict:
        row = self._reduce_stats()
        row.update(step=loop.step, tokens_per_s=row["tokens"] / max(step_s, 1e-9))
        if self.collapse.update(torch.tensor(row["load"])):
            log.warning("router collapse: one expert took more than %.0f%% of top-1 tokens in every "
                        "layer for %d steps (step %d, per-layer top-1 load %s)",
                        100 * self.collapse.threshold, self.collapse.steps, loop.step, row["load"])
        if loop.tb.enabled and loop.is_log_step(self.fcfg.train.log_every):
            self._log(loop, row)
        return row

    def _log(self, loop: TrainLoop, row: dict) -> None:
        tb, step = loop.tb, loop.step
        tb.scalars(step, {(k if "/" in k else f"speed/{k}"): v for k, v in row.items()
                          if k.startswith(("loss/", "router/", "routing_acc/")) or k == "tokens_per_s"})
        for layer, loads in enumerate(row["load"]):
            for name, value in zip(self.expert_names, loads):
                tb.writer.add_scalar(f"load/layer{layer}/{name}", value, step)
        if self.initial_experts:
            from .losses import expert_drift
            drift = expert_drift(loop.engine.module, self.initial_experts, self.num_experts)
            for name, value in zip(self.expert_names, drift.tolist()):
                tb.writer.add_scalar(f"drift_norm/{name}", value, step)
        tb.writer.flush()

    def client_state(self) -> dict:
        return {"collapse_streak": self.collapse.streak}

    def restore(self, client_state: dict) -> None:
        self.collapse.streak = int(client_state.get("collapse_streak", 0))


class FusionLoop:
    """Stage 2 set-up (MoE model, ZeRO engine) around the shared `TrainLoop`."""

    def __init__(self, cfg: PipelineConfig, paths, raw_ds: dict, batches, precision=None):
        """`precision`: the resolved `fusion.train.precision` (`mixed_precision.TrainPrecision`;
        None: resolved here, on this machine's accelerator)."""
        from ...env import accelerator_kind
        from ..mixed_precision import TrainPrecision
        self.cfg, self.fcfg, self.paths, self.batches = cfg, cfg.fusion, paths, batches
        self.raw_ds, self.precision = raw_ds, precision or TrainPrecision.resolve(
            "fusion.train.precision", cfg.fusion.train.precision, accelerator_kind())
        self.stop = install_stop_handlers()
        self.on_periodic_save: Optional[Callable[["FusionLoop"], None]] = None
        self.loop: Optional[TrainLoop] = None

    @property
    def engine(self):
        return self.loop.engine

    @property
    def history(self) -> list[dict]:
        return self.loop.history

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def last_tag(self) -> Optional[str]:
        return self.loop.last_tag

    # ------------------------------------------------------------------ set-up
    def setup(self, resume_if_present: bool) -> None:
        from ...backends import deepspeed_engine as dse
        from ...model.trainable import trainable_param_groups

        env, t = dist_env(), self.fcfg.train
        self.ds = dse.resolve_ds_config(self.raw_ds, dse.DsTrainSettings(
            t.micro_batch_size, t.grad_accum_steps, t.grad_clip, t.lr, t.weight_decay, env.world_size,
            self.precision.resolved))
        dse.init_distributed()
        seed_everything(t.seed)   # same LoRA init on every rank
        model = self._build_model(dse)
        task = FusionTask(self.fcfg, self.batches, model.config, self._snapshot_experts(model))
        total = self.batches.total_steps
        engine = dse.build_engine(
            model, self.ds, trainable_param_groups(model, self.fcfg.router_lr), lr=t.lr,
            weight_decay=t.weight_decay,
            lr_multiplier=partial(warmup_cosine, total=total, warmup=t.warmup_steps),
            autocast=self.precision.autocast)
        task.initial_experts = self._place_snapshot(task.initial_experts, engine)
        settings = LoopSettings(
            total_steps=total, grad_accum_steps=t.grad_accum_steps, save_every=t.save_every,
            config_key="fusion_config",
            config=comparable_config(to_dict(self.fcfg), self.precision.resolved),
            tb_dir=self.paths.tensorboard, desc="fuse", rank0=dist.get_rank() == 0)
        self.loop = TrainLoop(engine, task, settings, dse.DsCheckpoints(engine, self.paths.ds_dir),
                              self.stop, on_save=self._periodic_save)
        if resume_if_present and self.loop.resume() is not None:
            log.info("resumed from %s/%s at step %d", self.paths.ds_dir, self.last_tag, self.step)

    def _build_model(self, dse):
        from ...model import H3FusionForCausalLM, H3FusionMoE, apply_expert_parallel
        from ...model import set_moe_backend, set_trainable

        zero3 = self.ds["zero_optimization"]["stage"] == 3
        model = self._load_model(H3FusionForCausalLM, dse, zero3)
        prepare_for_training(model, self.fcfg.train.gradient_checkpointing)
        if zero3:
            dse.set_leaf_modules(model, [H3FusionMoE])
            # ZeRO-3 re-gathers a module's weights in backward from hooks that need grad-carrying
            # inputs; with frozen embeddings nothing upstream of the routers requires grad.
            model.enable_input_require_grads()
        set_moe_backend(model, self.fcfg.moe_backend)
        apply_expert_parallel(model, expert_parallel_group(self.fcfg.ep_degree))
        lora = self.fcfg.lora
        return set_trainable(model, self.fcfg.trainable, lora.r, lora.alpha, lora.dropout,
                             lora.target_modules)

    def _load_model(self, cls, dse, zero3: bool):
        """The fused MoE in the training dtype (bf16 under DeepSpeed bf16 on a GPU, fp32 on the
        CPU). ZeRO-3: transformers' `from_pretrained` under zero.Init, each rank holding only its
        partition. ZeRO-2: built on meta and read shard by shard straight onto this rank's
        device (`pipeline.model.loading`), never a full fp32 copy on the host."""
        from ...model.loading import load_streamed

        # the routing top-k is the built model's own (check_fusion_settings: fusion.top_k agrees)
        dtype, overrides = dse.train_dtype(self.ds), dict(moe_backend="torch")
        if zero3:
            with dse.zero3_init_context(self.ds):
                return cls.from_pretrained(str(self.paths.init), dtype=dtype, **overrides)
        model = load_streamed(self.paths.init, dtype, dse.train_device(), **overrides)
        if not isinstance(model, cls):
            raise ValueError(f"{self.paths.init}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def _snapshot_experts(self, model) -> list:
        """Expert weights at fusion start (drift reference; taken before a resume loads the
        checkpoint, so it is always the fused_init weights); empty when experts are frozen."""
        from .losses import snapshot_expert_params
        from ...model.trainable import trainable_set
        if not trainable_set(self.fcfg.trainable).trains_experts:
            return []
        # a copy in the training dtype, on the model's device (already the engine's, except
        # under ZeRO-3, where the drift penalty is refused); `_place_snapshot` moves it otherwise
        return snapshot_expert_params(model)

    @staticmethod
    def _place_snapshot(snapshot: list, engine) -> list:
        """The snapshot on the device of the engine's experts (one copy, not one per step)."""
        from .losses import expert_param_triples, move_snapshot
        if not snapshot:
            return snapshot
        return move_snapshot(snapshot, expert_param_triples(engine.module)[0][0].device)

    def _periodic_save(self, loop: TrainLoop) -> None:
        if self.on_periodic_save is not None:
            self.on_periodic_save(self)

    # ------------------------------------------------------------------ loop
    def run(self, on_step_end: Optional[Callable] = None) -> str:
        """Train to the last step; return "done" or "stopped" (signal checkpoint saved).
        `on_step_end(step, fusion_loop)` runs after every optimizer step."""
        if on_step_end is not None:
            self.loop.on_step_end = lambda lp: on_step_end(lp.step, self)
        return self.loop.run()

    def consolidated_model(self):
        """All ranks call; rank 0 gets a plain H3FusionForCausalLM (LoRA merged), others None."""
        from ...backends import deepspeed_engine as dse
        from ...model import set_trainable
        from ...model.loading import model_from_state_dict

        state = dse.consolidated_state_dict(self.engine)
        if state is None:
            return None
        lora = self.fcfg.lora
        # built on meta around the consolidated tensors themselves (no second copy), in their
        # dtype: fp32 on the CPU, the engine's 16-bit weights on a GPU
        model = model_from_state_dict(
            state, self.paths.init,
            wrap=lambda m: set_trainable(m, self.fcfg.trainable, lora.r, lora.alpha, lora.dropout,
                                         lora.target_modules))
        del state
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.config.moe_backend = self.fcfg.moe_backend
        return model

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"steps": self.step, "final": last, "trainable": self.fcfg.trainable,
                "ep_degree": self.fcfg.ep_degree, "zero_stage": self.ds["zero_optimization"]["stage"],
                "precision": self.precision.record()}

    def close(self) -> None:
        self.stop.uninstall()

"""The fusion training loop: model + DeepSpeed engine set-up, steps, guards, logging, checkpoints.

Every rank runs the same steps; decisions that must agree across ranks (non-finite loss, stop
signal) are all-reduced first, so all ranks checkpoint or stop at the same step.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config import PipelineConfig, to_dict
from ..env import dist_env
from . import fusion_metrics as fm
from .common import RankZeroLog, restore_rng_state, rng_state, seed_everything
from .common import warmup_cosine_schedule
from .signals import any_rank_requested, install_stop_handlers

_RESUME_IGNORED = ("log_every", "save_every")   # may change between a run and its resume

log = logging.getLogger("h3fusion.fuse")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops; the message names the step and last checkpoint."""


def _comm_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to(_comm_device(), torch.float64, copy=True)
    dist.all_reduce(t)
    return t.cpu()


def expert_parallel_group(ep_degree: int):
    """Consecutive ranks form an EP group; every rank creates every group (a collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, ep_degree):
        group = dist.new_group(list(range(start, start + ep_degree)))
        if start <= rank < start + ep_degree:
            mine = group
    return mine if ep_degree > 1 else None


class FusionLoop:
    """Owns the engine and the run state (step, metrics, collapse streak)."""

    def __init__(self, cfg: PipelineConfig, paths, raw_ds: dict, batches):
        self.cfg, self.fcfg, self.paths, self.batches = cfg, cfg.fusion, paths, batches
        self.raw_ds = raw_ds
        self.step, self.last_tag = 0, None
        self.collapse = fm.CollapseDetector(self.fcfg.collapse_threshold, self.fcfg.collapse_steps)
        self.history: list[dict] = []   # one row of scalars per optimizer step (all ranks equal)
        self.stop = install_stop_handlers()
        self.tb: Optional[RankZeroLog] = None
        self.on_periodic_save: Optional[Callable[["FusionLoop"], None]] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, resume_if_present: bool) -> None:
        from ..backends import deepspeed_engine as dse
        from ..model import H3FusionForCausalLM, H3FusionMoE, apply_expert_parallel
        from ..model import set_moe_backend, set_trainable
        from ..model.trainable import trainable_param_groups

        env, t = dist_env(), self.fcfg.train
        self.ds = dse.resolve_ds_config(self.raw_ds, dse.DsTrainSettings(
            t.micro_batch_size, t.grad_accum_steps, t.grad_clip, t.lr, t.weight_decay, env.world_size))
        dse.init_distributed()
        seed_everything(t.seed)   # same LoRA init on every rank
        zero3 = self.ds["zero_optimization"]["stage"] == 3
        model = self._load_model(H3FusionForCausalLM, dse, zero3)
        if zero3:
            dse.set_leaf_modules(model, [H3FusionMoE])
            # ZeRO-3 re-gathers a module's weights in backward from hooks that need grad-carrying
            # inputs; with frozen embeddings nothing upstream of the routers requires grad.
            model.enable_input_require_grads()
        set_moe_backend(model, self.fcfg.moe_backend)
        apply_expert_parallel(model, expert_parallel_group(self.fcfg.ep_degree))
        lora = self.fcfg.lora
        model = set_trainable(model, self.fcfg.trainable, lora.r, lora.alpha, lora.dropout)
        self.num_experts = model.config.num_experts
        self.expert_names = list(model.config.expert_names)
        self.gamma_E = torch.tensor([self.fcfg.gamma.get(n, 0.0) for n in self.expert_names])
        self.initial_experts = self._snapshot_experts(model)
        self.engine = dse.build_engine(
            model, self.ds, trainable_param_groups(model, self.fcfg.router_lr), lr=t.lr,
            weight_decay=t.weight_decay,
            scheduler_factory=warmup_cosine_schedule(t.warmup_steps, self.batches.total_steps))
        if resume_if_present and dse.latest_tag(self.paths.ds_dir) is not None:
            self._resume(dse)

    def _load_model(self, cls, dse, zero3: bool):
        kwargs = dict(dtype=torch.float32, top_k=self.fcfg.top_k, moe_backend="torch")
        if zero3:
            with dse.zero3_init_context(self.ds):
                return cls.from_pretrained(str(self.paths.init), **kwargs)
        return cls.from_pretrained(str(self.paths.init), **kwargs)

    def _snapshot_experts(self, model) -> list:
        """Expert weights at fusion start (drift reference; taken before a resume loads the
        checkpoint, so it is always the fused_init weights); empty when experts are frozen."""
        from ..losses import snapshot_expert_params
        if self.fcfg.trainable != "router+experts":
            return []
        return snapshot_expert_params(model, device="cpu")

    def _resume(self, dse) -> None:
        tag, client, rank_state = dse.load_checkpoint(self.engine, self.paths.ds_dir)
        saved, now = client.get("fusion_config"), self._comparable_config()
        if saved is not None and saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(f"{self.paths.ds_dir}/{tag}: checkpoint was trained with different "
                             f"fusion settings ({diff}); use the same config or a new run dir")
        self.step, self.last_tag = int(client["step"]), tag
        self.history = list(client.get("history", []))
        self.collapse.streak = int(client.get("collapse_streak", 0))
        restore_rng_state(rank_state)
        log.info("resumed from %s/%s at step %d", self.paths.ds_dir, tag, self.step)

    def _comparable_config(self) -> dict:
        cfg = to_dict(self.fcfg)
        for key in _RESUME_IGNORED:
            cfg["train"].pop(key)
        return cfg

    # ------------------------------------------------------------------ one step
    def _losses(self, out, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .. import losses

        probs = [r.probs_TE for r in out.router_outputs]
        mask, label = batch["attention_mask"], batch["task_label"]
        gate_mask = losses.gate_token_mask(mask, batch["labels"], self.fcfg.gate_tokens)
        terms = {"ce": out.loss, "gate": losses.gating_loss(probs, gate_mask, label)}
        total = terms["ce"] + self.fcfg.lambda_gate * terms["gate"]
        if self.initial_experts and bool((self.gamma_E > 0).any()):
            terms["drift"] = losses.drift_penalty(self.engine.module, self.initial_experts, self.gamma_E)
            total = total + terms["drift"]
        if self.fcfg.load_balance_coef > 0:
            terms["load_balance"] = losses.load_balance_loss(
                probs, [r.topk_idx_TK for r in out.router_outputs], mask)
            total = total + self.fcfg.load_balance_coef * terms["load_balance"]
        if self.fcfg.z_loss_coef > 0:
            terms["z_loss"] = losses.router_z_loss([r.logits_TE for r in out.router_outputs], mask)
            total = total + self.fcfg.z_loss_coef * terms["z_loss"]
        terms["total"] = total
        return total, terms

    def _micro_step(self, batch, stats: dict) -> None:
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])
        total, terms = self._losses(out, batch)
        if _max_over_ranks(0.0 if fm.loss_is_finite(float(total.detach())) else 1.0) > 0:
            raise NonFiniteLossError(
                f"loss is {float(total)} (terms: { {k: float(v) for k, v in terms.items()} }) at step "
                f"{self.step + 1}; last good checkpoint: "
                f"{self.paths.ds_dir / self.last_tag if self.last_tag else 'none saved yet'}")
        self.engine.backward(total)
        self.engine.step()
        self._accumulate(stats, out, batch, terms)

    def _accumulate(self, stats: dict, out, batch, terms) -> None:
        mask, label = batch["attention_mask"], batch["task_label"]
        probs = [r.probs_TE.detach() for r in out.router_outputs]
        topk = [r.topk_idx_TK for r in out.router_outputs]
        correct, total = fm.top1_routing_hits(probs, mask, label)
        vec = torch.cat([torch.tensor([float(v.detach()) for v in terms.values()] +
                                      [float(fm.routing_entropy(probs, mask)), float(mask.sum()), 1.0]),
                         correct, total, fm.top1_load(topk, mask, self.num_experts).cpu().reshape(-1)])
        stats["keys"] = list(terms)
        stats["vec"] = vec if "vec" not in stats else stats["vec"] + vec.double()

    def _reduce_stats(self, stats: dict) -> dict:
        """Sum the step's stats over ranks; return means and per-task accuracies."""
        vec = _sum_over_ranks(stats["vec"])
        keys, k, E = stats["keys"], len(stats["keys"]), self.num_experts
        micro = vec[k + 2]
        row = {f"loss/{name}": float(vec[i] / micro) for i, name in enumerate(keys)}
        row["router/entropy"] = float(vec[k] / micro)
        row["tokens"] = float(vec[k + 1])
        correct, total = vec[k + 3:k + 3 + E], vec[k + 3 + E:k + 3 + 2 * E]
        for name, acc in fm.accuracy_by_name(correct, total, self.expert_names).items():
            row[f"routing_acc/{name}"] = acc
        load = (vec[k + 3 + 2 * E:] / micro).reshape(-1, E)
        row["load"] = load.tolist()
        return row

    # ------------------------------------------------------------------ loop
    def run(self, on_step_end: Optional[Callable] = None) -> str:
        """Train to the last step; return "done" or "stopped" (signal checkpoint saved)."""
        total_steps = self.batches.total_steps
        self.tb = RankZeroLog(self.paths.tensorboard, total_steps, self.step,
                              dist.get_rank() == 0, desc="fuse")
        while self.step < total_steps:
            t0, stats = time.time(), {}
            for micro in range(self.fcfg.train.grad_accum_steps):
                self._micro_step(self.batches.get(self.step, micro), stats)
            self.step += 1
            row = self._reduce_stats(stats)
            row.update(step=self.step, tokens_per_s=row["tokens"] / max(time.time() - t0, 1e-9))
            self.history.append(row)
            self._check_collapse(row)
            self._log(row)
            if on_step_end is not None:
                on_step_end(self.step, self)
            stop = any_rank_requested(self.stop.requested, _max_over_ranks)
            every = self.fcfg.train.save_every
            if stop or (every > 0 and self.step % every == 0 and self.step < total_steps):
                self.save_checkpoint()
                if self.on_periodic_save is not None:
                    self.on_periodic_save(self)
            if stop:
                return "stopped"
        self.save_checkpoint()
        return "done"

    def _check_collapse(self, row: dict) -> None:
        if self.collapse.update(torch.tensor(row["load"])):
            log.warning("router collapse: one expert took more than %.0f%% of top-1 tokens in every "
                        "layer for %d steps (step %d, per-layer top-1 load %s)",
                        100 * self.collapse.threshold, self.collapse.steps, self.step, row["load"])

    def _log(self, row: dict) -> None:
        self.tb.advance()
        every = max(1, self.fcfg.train.log_every)
        if not self.tb.enabled or (self.step % every and self.step != self.batches.total_steps):
            return
        self.tb.scalars(self.step, {(k if "/" in k else f"speed/{k}"): v for k, v in row.items()
                                    if k.startswith(("loss/", "router/", "routing_acc/"))
                                    or k == "tokens_per_s"})
        for layer, loads in enumerate(row["load"]):
            for name, value in zip(self.expert_names, loads):
                self.tb.writer.add_scalar(f"load/layer{layer}/{name}", value, self.step)
        if self.initial_experts:
            from ..losses import expert_drift
            drift = expert_drift(self.engine.module, self.initial_experts, self.num_experts)
            for name, value in zip(self.expert_names, drift.tolist()):
                self.tb.writer.add_scalar(f"drift_norm/{name}", value, self.step)
        self.tb.writer.flush()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        from ..backends import deepspeed_engine as dse
        tag = f"step{self.step:07d}"
        client = {"step": self.step, "fusion_config": self._comparable_config(),
                  "history": self.history, "collapse_streak": self.collapse.streak}
        dse.save_checkpoint(self.engine, self.paths.ds_dir, tag, client, rank_state=rng_state())
        self.last_tag = tag

    def consolidated_model(self):
        """All ranks call; rank 0 gets a plain H3FusionForCausalLM (LoRA merged), others None."""
        from ..backends import deepspeed_engine as dse
        from ..model import H3FusionForCausalLM, set_trainable

        state = dse.consolidated_state_dict(self.engine)
        if state is None:
            return None
        model = H3FusionForCausalLM.from_pretrained(str(self.paths.init), dtype=torch.float32,
                                                    top_k=self.fcfg.top_k)
        lora = self.fcfg.lora
        model = set_trainable(model, self.fcfg.trainable, lora.r, lora.alpha, lora.dropout)
        model.load_state_dict(state, strict=True)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.config.moe_backend = self.fcfg.moe_backend
        return model

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"steps": self.step, "final": last, "trainable": self.fcfg.trainable,
                "ep_degree": self.fcfg.ep_degree, "zero_stage": self.ds["zero_optimization"]["stage"]}

    def close(self) -> None:
        self.stop.uninstall()
        if self.tb is not None:
            self.tb.close()

"""Routing diagnostics for fusion training: pure functions over router outputs (no I/O, no dist).

Inputs follow the `RouterOutput` contract: per layer `probs_TE` (softmax over all E experts),
`topk_idx_TK`; `T = B*S` flattened row-major from `[B, S]`. Padding tokens (attention mask 0)
are excluded everywhere. Sums are returned (not means) where a caller accumulates them over
steps or all-reduces them over ranks before dividing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def _token_mask(attention_mask_BS: torch.Tensor, num_tokens: int) -> torch.Tensor:
    mask_T = attention_mask_BS.reshape(-1).bool()
    if mask_T.numel() != num_tokens:
        raise ValueError(f"attention mask has {mask_T.numel()} tokens but router probs have "
                         f"{num_tokens} rows (expected T = B*S)")
    return mask_T


def routing_entropy(probs_per_layer: Sequence[torch.Tensor],
                    attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Mean (over real tokens and layers) entropy in nats of the full router softmax."""
    values = []
    for probs_TE in probs_per_layer:
        mask_T = _token_mask(attention_mask_BS, probs_TE.shape[0])
        p = probs_TE[mask_T].float()
        values.append(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
    return torch.stack(values).mean()


def top1_load(router_topk_idx: Sequence[torch.Tensor], attention_mask_BS: torch.Tensor,
              num_experts: int) -> torch.Tensor:
    """`[L, E]`: per layer, the fraction of real tokens whose top-1 expert is e (rows sum to 1)."""
    rows = []
    for topk_idx_TK in router_topk_idx:
        mask_T = _token_mask(attention_mask_BS, topk_idx_TK.shape[0])
        top1_T = topk_idx_TK[mask_T, 0].long()
        counts_E = torch.bincount(top1_T, minlength=num_experts).float()
        rows.append(counts_E / counts_E.sum().clamp_min(1.0))
    return torch.stack(rows)


def routed_load(router_topk_idx: Sequence[torch.Tensor], attention_mask_BS: torch.Tensor,
                num_experts: int) -> torch.Tensor:
    """`[L, E]`: per layer, the fraction of token->expert assignments (all k) that go to e."""
    rows = []
    for topk_idx_TK in router_topk_idx:
        mask_T = _token_mask(attention_mask_BS, topk_idx_TK.shape[0])
        counts_E = torch.bincount(topk_idx_TK[mask_T].reshape(-1).long(), minlength=num_experts)
        rows.append(counts_E.float() / counts_E.sum().clamp_min(1))
    return torch.stack(rows)


def top1_routing_hits(probs_per_layer: Sequence[torch.Tensor], attention_mask_BS: torch.Tensor,
                      task_label_BE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task token-level top-1 routing hits: `(correct_E, total_E)` summed over layers.

    A sample's task is the argmax of its (possibly soft) label; a real token of a task-i sample
    counts as correct in a layer when that layer's highest-probability expert is expert i.
    Accuracy for task i is `correct_E[i] / total_E[i]` (after summing over steps/ranks).
    """
    B, S = attention_mask_BS.shape
    E = task_label_BE.shape[1]
    task_T = task_label_BE.argmax(dim=1).repeat_interleave(S)
    correct_E = torch.zeros(E, dtype=torch.float64)
    total_E = torch.zeros(E, dtype=torch.float64)
    for probs_TE in probs_per_layer:
        if probs_TE.shape[1] != E:
            raise ValueError(f"router has {probs_TE.shape[1]} experts but task labels have width {E}")
        mask_T = _token_mask(attention_mask_BS, probs_TE.shape[0])
        task = task_T[mask_T].cpu()
        hit = (probs_TE[mask_T].argmax(dim=1).cpu() == task).double()
        correct_E += torch.bincount(task, weights=hit, minlength=E)
        total_E += torch.bincount(task, minlength=E).double()
    return correct_E, total_E


def accuracy_by_name(correct_E: torch.Tensor, total_E: torch.Tensor,
                     names: Sequence[str]) -> dict[str, float]:
    """`{expert name: accuracy}` for experts whose task had any tokens (others left out)."""
    return {name: float(correct_E[i] / total_E[i]) for i, name in enumerate(names) if total_E[i] > 0}


@dataclass
class CollapseDetector:
    """Flags router collapse: one expert takes > `threshold` of top-1 tokens in EVERY layer for
    `steps` consecutive updates. `update` returns True once per collapsed streak (when it
    reaches `steps`), so a caller logs one warning, not one per step."""
    threshold: float
    steps: int
    streak: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"collapse_threshold must be in (0, 1], got {self.threshold}")
        if self.steps < 1:
            raise ValueError(f"collapse_steps must be >= 1, got {self.steps}")

    @staticmethod
    def is_collapsed(top1_load_LE: torch.Tensor, threshold: float) -> bool:
        return bool((top1_load_LE.max(dim=1).values > threshold).all())

    def update(self, top1_load_LE: torch.Tensor) -> bool:
        collapsed = self.is_collapsed(top1_load_LE, self.threshold)
        self.streak = self.streak + 1 if collapsed else 0
        return self.streak == self.steps

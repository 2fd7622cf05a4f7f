"""Fusion-training losses, as pure functions of tensors (no module or global state).

The fused objective is `L = L_CE + λ·gating_loss + Σ_i γ_i·drift_i` (+ optional Switch
load-balancing and router z-loss). Routing tensors come from `output.router_outputs`:
`probs_per_layer = [r.probs_TE for r in out.router_outputs]` etc., with T = B*S row-major.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

_EPS = 1e-9
ExpertTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _token_mask_T(attention_mask_BS: torch.Tensor | None, num_tokens: int,
                  device: torch.device) -> torch.Tensor:
    if attention_mask_BS is None:
        return torch.ones(num_tokens, device=device)
    if attention_mask_BS.numel() != num_tokens:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask_BS.shape)} "
                         f"({attention_mask_BS.numel()} tokens) but routing has T={num_tokens}")
    return attention_mask_BS.reshape(-1).to(device=device, dtype=torch.float32)


def sample_routing_probs(probs_per_layer: Sequence[torch.Tensor],
                         attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """p̄ [B, E]: each sample's routing probabilities averaged over its non-padding tokens, then
    over layers."""
    if len(probs_per_layer) == 0:
        raise ValueError("probs_per_layer is empty (no MoE layers)")
    batch, seq = attention_mask_BS.shape
    mask_BS = attention_mask_BS.to(torch.float32)
    tokens_B = mask_BS.sum(dim=1)
    if bool((tokens_B == 0).any()):
        rows = torch.nonzero(tokens_B == 0).flatten().tolist()
        raise ValueError(f"gating loss: batch rows {rows} have no non-padding tokens")
    per_layer = []
    for layer, probs_TE in enumerate(probs_per_layer):
        if probs_TE.shape[0] != batch * seq:
            raise ValueError(f"layer {layer}: probs have T={probs_TE.shape[0]} rows, "
                             f"attention_mask is [{batch}, {seq}] (T={batch * seq})")
        probs_BSE = probs_TE.float().view(batch, seq, -1)
        per_layer.append((probs_BSE * mask_BS[..., None]).sum(dim=1) / tokens_B[:, None])
    return torch.stack(per_layer).mean(dim=0)


def predicts_response_mask(labels_BS: torch.Tensor) -> torch.Tensor:
    """Positions whose *next* label is a response token: HF causal LMs shift labels inside the
    loss (logits at t predict labels[t+1]), so these are the positions whose routing decides the
    response — the last prompt position (it picks the first response token) included, the final
    EOS position (it predicts nothing) excluded. Bool [B, S]."""
    mask = torch.zeros_like(labels_BS, dtype=torch.bool)
    mask[:, :-1] = labels_BS[:, 1:] != -100
    return mask


def response_span_masks(starts_B: torch.Tensor, lengths_B: torch.Tensor,
                        seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences `prompt + response` (real length `lengths_B`, response starting at
    `starts_B`): the positions that predict a response token, t in [start-1, length-2], and the
    one that predicts the first response token, t = start-1 (both bool [B, S]); the same
    positions as `predicts_response_mask` on the SFT labels of those sequences."""
    pos = torch.arange(seq_len).unsqueeze(0)
    first = (starts_B - 1).unsqueeze(1)
    span = (pos >= first) & (pos <= (lengths_B - 2).unsqueeze(1))
    return span, span & (pos == first)


def first_response_mask(labels_BS: torch.Tensor) -> torch.Tensor:
    """The one position per sequence that predicts the first response token (its own label is
    prompt, -100; the next one is not): where the routing decides how the answer starts, e.g.
    a refusal or not. Bool [B, S]."""
    mask = torch.zeros_like(labels_BS, dtype=torch.bool)
    mask[:, :-1] = (labels_BS[:, 1:] != -100) & (labels_BS[:, :-1] == -100)
    return mask


# fusion.gate_tokens: which positions the gating loss averages over (config.GATE_TOKENS)
_GATE_TOKEN_MASKS = {
    "response": predicts_response_mask,
    "first_response": first_response_mask,
}


def gate_token_mask(attention_mask_BS: torch.Tensor, labels_BS: torch.Tensor, tokens: str) -> torch.Tensor:
    """Tokens the gating loss averages over: "all" non-padding tokens, the "response" positions
    (`predicts_response_mask`; the shared prompt template carries no task signal for a causal
    router), or only the "first_response" position (`first_response_mask`)."""
    if tokens == "all":
        return attention_mask_BS
    if tokens not in _GATE_TOKEN_MASKS:
        raise ValueError(f"gate tokens must be one of all, {', '.join(_GATE_TOKEN_MASKS)}; got {tokens!r}")
    return attention_mask_BS * _GATE_TOKEN_MASKS[tokens](labels_BS).to(attention_mask_BS.dtype)


def gating_loss(probs_per_layer: Sequence[torch.Tensor], attention_mask_BS: torch.Tensor,
                task_label_BE: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between soft task labels y and the sample's mean routing probs p̄:
    `mean_b( −Σ_e y_be · log p̄_be )`. p̄ is already a distribution (softmax then averages), so
    no second softmax is applied."""
    p_bar_BE = sample_routing_probs(probs_per_layer, attention_mask_BS)
    if task_label_BE.shape != p_bar_BE.shape:
        raise ValueError(f"task_label has shape {tuple(task_label_BE.shape)}, routing gives "
                         f"[B, E] = {list(p_bar_BE.shape)}")
    labels = task_label_BE.to(p_bar_BE.device, torch.float32)
    return -(labels * torch.log(p_bar_BE.clamp_min(_EPS))).sum(dim=-1).mean()


def expert_param_triples(model_or_params) -> list[ExpertTriple]:
    """One (w1, v1, w2) per MoE layer, in module order, from a model or a list of triples."""
    if isinstance(model_or_params, nn.Module):
        from ...model.moe import GLUExperts
        triples = [(m.w1, m.v1, m.w2) for m in model_or_params.modules()
                   if isinstance(m, GLUExperts)]
        if not triples:
            raise ValueError(f"{type(model_or_params).__name__} has no MoE expert layers")
        return triples
    return [tuple(t) for t in model_or_params]


def snapshot_expert_params(model: nn.Module, device: torch.device | str | None = None
                           ) -> list[ExpertTriple]:
    """θ⁰ for the drift penalty: detached copies of every layer's w1/v1/w2 (call at fusion start),
    on the experts' own device unless `device` says otherwise. The penalty reads the snapshot
    every step, so it must live where the experts live (see `move_snapshot`)."""
    return [tuple(w.detach().to(device or w.device, copy=True) for w in triple)
            for triple in expert_param_triples(model)]


def move_snapshot(initial_params: Sequence[ExpertTriple], device: torch.device | str
                  ) -> list[ExpertTriple]:
    """The snapshot on `device`, moved once (e.g. after the engine has put the experts on the
    accelerator) instead of copied host→device in every step's penalty."""
    return [tuple(w.to(device) for w in triple) for triple in initial_params]


def expert_drift(model_or_params, initial_params: Sequence[ExpertTriple],
                 num_experts: int) -> torch.Tensor:
    """[E]: per expert i, ‖θ_i − θ_i⁰‖₂ (θ_i = its w1/v1/w2 rows, as one vector) averaged over
    layers."""
    current = expert_param_triples(model_or_params)
    if len(current) != len(initial_params):
        raise ValueError(f"drift: model has {len(current)} MoE layers, snapshot has "
                         f"{len(initial_params)}")
    per_layer = []
    for layer, (now, start) in enumerate(zip(current, initial_params)):
        if any(a.shape != b.shape for a, b in zip(now, start)):
            raise ValueError(f"drift: layer {layer} expert shapes {[tuple(a.shape) for a in now]} "
                             f"!= snapshot {[tuple(b.shape) for b in start]}")
        if any(a.device != b.device for a, b in zip(now, start)):
            raise ValueError(f"drift: layer {layer} experts are on {now[0].device} but the "
                             f"snapshot is on {start[0].device}; move it once with move_snapshot "
                             f"(a per-step copy costs a host→device transfer of every expert)")
        norms_3E = torch.stack([
            torch.linalg.vector_norm((a - b).float().view(num_experts, -1), dim=1)
            for a, b in zip(now, start)])
        per_layer.append(torch.linalg.vector_norm(norms_3E, dim=0))
    return torch.stack(per_layer).mean(dim=0)


def drift_penalty(model_or_params, initial_params: Sequence[ExpertTriple],
                  gamma_E: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Σ_i γ_i · drift_i, with drift_i = ‖θ_i − θ_i⁰‖₂ averaged over layers.

    `model_or_params`: the fused model (its GLUExperts, in module order, so a PEFT-wrapped model
    works) or a list of (w1, v1, w2) per layer. `initial_params`: `snapshot_expert_params(model)`
    taken at fusion start. `gamma_E`: one weight per expert, in expert order. The gradient at
    θ = θ⁰ is 0 (not NaN).
    """
    gamma = torch.as_tensor(gamma_E, dtype=torch.float32)
    drift_E = expert_drift(model_or_params, initial_params, num_experts=gamma.numel())
    return (gamma.to(drift_E.device) * drift_E).sum()


def load_balance_loss(probs_per_layer: Sequence[torch.Tensor],
                      topk_idx_per_layer: Sequence[torch.Tensor],
                      attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load balancing, averaged over layers: `E · Σ_e f_e · P_e` with f_e the
    fraction of (non-padding) token-expert assignments sent to e and P_e the mean router prob
    of e. Equals 1 for perfectly uniform routing."""
    losses = []
    for probs_TE, topk_idx_TK in zip(probs_per_layer, topk_idx_per_layer, strict=True):
        num_tokens, num_experts = probs_TE.shape
        mask_T = _token_mask_T(attention_mask_BS, num_tokens, probs_TE.device)
        onehot_TE = torch.zeros_like(probs_TE, dtype=torch.float32).scatter_add_(
            1, topk_idx_TK, torch.ones_like(topk_idx_TK, dtype=torch.float32))
        count = mask_T.sum().clamp_min(1.0)
        frac_E = (onehot_TE * mask_T[:, None]).sum(0) / (count * topk_idx_TK.shape[1])
        mean_prob_E = (probs_TE.float() * mask_T[:, None]).sum(0) / count
        losses.append(num_experts * (frac_E * mean_prob_E).sum())
    return torch.stack(losses).mean()


def router_z_loss(logits_per_layer: Sequence[torch.Tensor],
                  attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (non-padding) tokens of logsumexp(logits)², averaged over
    layers; keeps router logits small."""
    losses = []
    for logits_TE in logits_per_layer:
        mask_T = _token_mask_T(attention_mask_BS, logits_TE.shape[0], logits_TE.device)
        z_T = torch.logsumexp(logits_TE.float(), dim=-1)
        losses.append((z_T.square() * mask_T).sum() / mask_T.sum().clamp_min(1.0))
    return torch.stack(losses).mean()

"""Pure primitives of a dropless top-k MoE layer (no modules; no state but a warn-once flag).

Shape suffixes: T tokens, H hidden, F ffn per expert, E experts, K top-k, P token-expert pairs
(= T*K). The experts' weights use the MegaBlocks GLU layout: `w1`, `v1`, `w2` each `[E*F, H]`;
expert `e` owns rows `e*F:(e+1)*F` and computes `(silu(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e`.

Dropless: every token reaches all of its k experts (no capacity factor); experts process a
variable number of rows, so the expert matmuls run over contiguous per-expert slices of the
token-expert pairs sorted by expert.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config_ranges import top_k_problem
from .grouped_glu import GroupedGLU, PairGather, WeightedPairSum

GroupedImpl = Literal["auto", "loop", "grouped_mm"]
log = logging.getLogger("h3fusion.routing")


@dataclass
class RouterOutput:
    """One layer's routing decision for T = B*S tokens (row-major over [B, S])."""
    logits_TE: torch.Tensor         # router logits
    probs_TE: torch.Tensor          # softmax over all E experts
    topk_idx_TK: torch.Tensor       # chosen experts, int64
    topk_weight_TK: torch.Tensor    # probs of the chosen experts renormalised over K
    tokens_per_expert_E: torch.Tensor  # how many of the T*K pairs each expert received, int64


def _autocast_dtype(x: torch.Tensor):
    """The dtype torch.autocast computes matmuls in on `x`'s device, or None when it is off."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_off(x: torch.Tensor):
    """Autocast switched off on `x`'s device for a block (nothing to do when it is off)."""
    if _autocast_dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def _router_logits(x_TH: torch.Tensor, router_weight_EH: torch.Tensor) -> torch.Tensor:
    """x @ W.T; under autocast (CPU bf16 training) in fp32 (an H x E matmul, negligible), so the
    routing decision and the router's z-loss do not see bf16 rounding."""
    if _autocast_dtype(x_TH) is None:
        return F.linear(x_TH, router_weight_EH)
    with _autocast_off(x_TH):
        return F.linear(x_TH.float(), router_weight_EH.float())


def route(x_TH: torch.Tensor, router_weight_EH: torch.Tensor, top_k: int) -> RouterOutput:
    """Linear router (no bias) -> softmax over E -> top-k -> renormalise the k weights."""
    num_experts = router_weight_EH.shape[0]
    problem = top_k_problem(top_k, num_experts)
    if problem:
        raise ValueError(f"top_k {problem}")
    logits_TE = _router_logits(x_TH, router_weight_EH)
    # softmax in fp32: bf16 probabilities are too coarse for the gating loss and for ties
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    topk_prob_TK, topk_idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    topk_weight_TK = topk_prob_TK / topk_prob_TK.sum(dim=-1, keepdim=True)
    tokens_per_expert_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts)
    return RouterOutput(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK, tokens_per_expert_E)


@dataclass
class Permutation:
    """Token-expert pairs sorted by expert: pair p is token `token_idx_P[p]` for expert `expert_idx_P[p]`."""
    order_P: torch.Tensor        # index into the flattened [T*K] pairs
    token_idx_P: torch.Tensor
    expert_idx_P: torch.Tensor
    inv_P: torch.Tensor          # inverse of order_P: where flat pair t*K+k sits after sorting


def permute(x_TH: torch.Tensor, topk_idx_TK: torch.Tensor) -> tuple[torch.Tensor, Permutation]:
    """Gather one row per token-expert pair, grouped by expert (stable: token order kept inside)."""
    top_k = topk_idx_TK.shape[1]
    flat_expert_P = topk_idx_TK.reshape(-1)
    order_P = torch.argsort(flat_expert_P, stable=True)
    token_idx_P = order_P // top_k
    inv_P = torch.empty_like(order_P)
    inv_P[order_P] = torch.arange(order_P.numel(), device=order_P.device)
    perm = Permutation(order_P, token_idx_P, flat_expert_P[order_P], inv_P)
    return PairGather.apply(x_TH, token_idx_P, inv_P, top_k), perm


def unpermute(y_PH: torch.Tensor, perm: Permutation, topk_weight_TK: torch.Tensor,
              num_tokens: int) -> torch.Tensor:
    """Weight each pair's expert output by its routing weight and sum the k pairs of each token
    (in `y_PH`'s dtype, also under autocast: the hand-written backward needs one dtype)."""
    if topk_weight_TK.shape[0] != num_tokens:
        raise ValueError(f"unpermute: {topk_weight_TK.shape[0]} weight rows for {num_tokens} tokens")
    with _autocast_off(y_PH):
        return WeightedPairSum.apply(y_PH, topk_weight_TK.to(y_PH.dtype), perm.token_idx_P,
                                     perm.order_P, perm.inv_P)


def grouped_mm_unavailable(device: torch.device | str, dtype: torch.dtype,
                           *dims: int) -> str | None:
    """Why `impl="auto"` runs the per-expert loop instead of `torch._grouped_mm` for inputs on
    `device` in `dtype` with matrix sizes `dims` (ffn, hidden), or None when it takes
    `_grouped_mm`. That needs CUDA, bf16, a torch that has it (>= 2.8: not torch 2.7, the
    megablocks set's), compute capability >= 9.0 and sizes divisible by 8 (16-byte aligned
    strides, which its backward needs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the input is on {device.type}, not CUDA"
    if dtype != torch.bfloat16:
        return f"the input is {dtype}, not torch.bfloat16"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8 has it)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (9, 0):
        return f"the GPU's compute capability is {capability[0]}.{capability[1]}, below 9.0"
    unaligned = [d for d in dims if d % 8]
    if unaligned:
        return f"matrix sizes {unaligned} are not multiples of 8"
    return None


def auto_impl(device: torch.device | str, dtype: torch.dtype, *dims: int) -> str:
    """The expert implementation `impl="auto"` runs for these inputs: "grouped_mm" or "loop"."""
    return "loop" if grouped_mm_unavailable(device, dtype, *dims) else "grouped_mm"


_warned_no_grouped_mm = False


def _auto_takes_grouped_mm(x: torch.Tensor, *dims: int) -> bool:
    """`auto_impl` for `x`; on CUDA bf16 with a torch that lacks `_grouped_mm`, one warning line
    per process the first time (the loop is correct, only slower)."""
    global _warned_no_grouped_mm
    why = grouped_mm_unavailable(x.device, x.dtype, *dims)
    lacking = x.is_cuda and x.dtype == torch.bfloat16 and not hasattr(torch, "_grouped_mm")
    if lacking and not _warned_no_grouped_mm:
        _warned_no_grouped_mm = True
        log.warning("torch MoE backend: %s, so the experts run as a loop of per-expert GEMMs on "
                    "CUDA bf16 (correct, slower; requirements-gpu-torch.txt has a torch with it)",
                    why)
    return why is None


def expert_glu(x_PH: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor,
               w2: torch.Tensor, impl: GroupedImpl = "auto") -> torch.Tensor:
    """GLU experts over pairs already grouped by expert; `counts_E[e]` rows belong to expert e.

    `w1/v1/w2` are `[E*F, H]` for the E experts in `counts_E` (a slice of the full stack under
    expert parallelism).
    """
    dtype = _autocast_dtype(x_PH)
    if dtype is not None:
        # under autocast (CPU bf16 training): the GEMMs in its dtype with autocast off, so the
        # hand-written backward sees one dtype; the output in x's dtype (expert parallelism
        # receives it into a buffer of x's dtype), gradients back in the weights' dtype
        with _autocast_off(x_PH):
            y_PH = expert_glu(x_PH.to(dtype), counts_E, w1.to(dtype), v1.to(dtype), w2.to(dtype),
                              impl)
        return y_PH.to(x_PH.dtype)
    num_experts = counts_E.shape[0]
    if w1.shape[0] % num_experts:
        raise ValueError(f"expert weights have {w1.shape[0]} rows, not a multiple of E={num_experts}")
    ffn, hidden = w1.shape[0] // num_experts, w1.shape[1]
    if int(counts_E.sum()) != x_PH.shape[0]:
        raise ValueError(f"counts_E sums to {int(counts_E.sum())} but x has {x_PH.shape[0]} rows")
    use_grouped = impl == "grouped_mm" or (impl == "auto"
                                           and _auto_takes_grouped_mm(x_PH, ffn, hidden))
    if not use_grouped:   # a loop of per-expert GEMMs with hand-written autograd (grouped_glu)
        return GroupedGLU.apply(x_PH, w1, v1, w2, counts_E.tolist())
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    w1_EHF = w1.view(num_experts, ffn, hidden).transpose(1, 2)
    v1_EHF = v1.view(num_experts, ffn, hidden).transpose(1, 2)
    w2_EFH = w2.view(num_experts, ffn, hidden)
    gate_PF = torch._grouped_mm(x_PH, w1_EHF, offs=offs_E)
    up_PF = torch._grouped_mm(x_PH, v1_EHF, offs=offs_E)
    return torch._grouped_mm(F.silu(gate_PF) * up_PF, w2_EFH, offs=offs_E)


def dropless_experts(x_TH: torch.Tensor, routing: RouterOutput, w1: torch.Tensor,
                     v1: torch.Tensor, w2: torch.Tensor,
                     impl: GroupedImpl = "auto") -> torch.Tensor:
    """The expert half of a single-process dropless MoE: permute, expert GLUs, weighted
    unpermute."""
    x_PH, perm = permute(x_TH, routing.topk_idx_TK)
    y_PH = expert_glu(x_PH, routing.tokens_per_expert_E, w1, v1, w2, impl)
    return unpermute(y_PH, perm, routing.topk_weight_TK, x_TH.shape[0])


def dropless_moe(x_TH: torch.Tensor, router_weight_EH: torch.Tensor, w1: torch.Tensor,
                 v1: torch.Tensor, w2: torch.Tensor, top_k: int,
                 impl: GroupedImpl = "auto") -> tuple[torch.Tensor, RouterOutput]:
    """Single-process dropless MoE: route, then `dropless_experts`."""
    routing = route(x_TH, router_weight_EH, top_k)
    return dropless_experts(x_TH, routing, w1, v1, w2, impl), routing


def naive_moe_reference(x_TH: torch.Tensor, router_weight_EH: torch.Tensor, w1: torch.Tensor,
                        v1: torch.Tensor, w2: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-token, per-chosen-expert loop: slow and obviously correct (tests only)."""
    num_experts = router_weight_EH.shape[0]
    ffn = w1.shape[0] // num_experts
    probs_TE = torch.softmax(F.linear(x_TH, router_weight_EH).float(), dim=-1)
    rows = []
    for t in range(x_TH.shape[0]):
        top_p, top_e = torch.topk(probs_TE[t], top_k)
        acc = torch.zeros_like(x_TH[t])
        for p, e in zip(top_p / top_p.sum(), top_e.tolist()):
            sl = slice(e * ffn, (e + 1) * ffn)
            h = F.silu(w1[sl] @ x_TH[t]) * (v1[sl] @ x_TH[t])
            acc = acc + p.to(x_TH.dtype) * (h @ w2[sl])
        rows.append(acc)
    return torch.stack(rows)


def naive_per_expert_moe(x_TH: torch.Tensor, router_weight_EH: torch.Tensor, w1: torch.Tensor,
                         v1: torch.Tensor, w2: torch.Tensor, top_k: int) -> tuple[torch.Tensor, RouterOutput]:
    """The common "loop over experts with a boolean mask" MoE (the benchmark's naive baseline)."""
    routing = route(x_TH, router_weight_EH, top_k)
    num_experts = router_weight_EH.shape[0]
    ffn = w1.shape[0] // num_experts
    out_TH = torch.zeros_like(x_TH)
    for e in range(num_experts):
        token_idx, slot = torch.nonzero(routing.topk_idx_TK == e, as_tuple=True)
        sl = slice(e * ffn, (e + 1) * ffn)
        x_e = x_TH[token_idx]
        y_e = (F.silu(x_e @ w1[sl].T) * (x_e @ v1[sl].T)) @ w2[sl]
        weight = routing.topk_weight_TK[token_idx, slot].to(x_TH.dtype)
        out_TH = out_TH.index_add(0, token_idx, y_e * weight[:, None])
    return out_TH, routing

"""Hand-written autograd for the loop path of the dropless MoE (any device; the CPU default).

Why not plain autograd: in a CPU profile of the former autograd version (4096 tokens, H 512,
F 1376, E 3, top-2) `cat`, `scatter_add_`, `fill_`, `add_` and `copy_` took about a third of
the fwd+bwd time: `select_backward` of `w.view(E, F, H)[e]` builds a zero [E, F, H] tensor per
expert and sums them, `cat` copies every block, and the backward of a row gather (and
`index_add` itself) is a scatter-add. Here the expert outputs, the input gradient and the
weight gradients are written with `out=` straight into their rows of one buffer (an expert's
rows of `w1/v1/w2 [E*F, H]` and its block of pairs are both contiguous), and the token<->pair
movements are gathers in both directions (the pairs are a permutation of the T*K token slots,
so the inverse of a gather is a gather).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _blocks(counts: list[int], ffn: int):
    """(pair rows, weight rows) of every expert with at least one pair."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield slice(start, start + n), slice(e * ffn, (e + 1) * ffn)
        start += n


def _weight_grad(weight: torch.Tensor, counts: list[int], ffn: int) -> torch.Tensor:
    """An uninitialised grad for `weight`, zeroed only in the rows of experts without pairs."""
    grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
    for e, n in enumerate(counts):
        if n == 0:
            grad[e * ffn:(e + 1) * ffn].zero_()
    return grad


class GroupedGLU(torch.autograd.Function):
    """y[block e] = (silu(x_e @ w1_e.T) * (x_e @ v1_e.T)) @ w2_e for contiguous blocks of rows.

    Intermediates are per expert, not one [P, F] buffer: glibc serves allocations above 32 MB
    with a fresh mmap every time, so a 45 MB buffer (4k tokens, F 1376) page-faults on every
    call, while per-expert blocks are reused from the heap (measured: the GEMMs and silu writing
    into one buffer ran slower than the naive loop's). Also measured slower on 2 CPU cores:
    one GEMM for stacked gate+up rows (`torch.cat` per call) and element-wise passes over
    cache-sized row chunks."""

    @staticmethod
    def forward(ctx, x_PH, w1, v1, w2, counts: list[int]):
        ffn = w1.shape[0] // len(counts)
        x_PH = x_PH.contiguous()
        y_PH = x_PH.new_empty(x_PH.shape)
        saved = []
        for r, w in _blocks(counts, ffn):
            gate, up = x_PH[r] @ w1[w].t(), x_PH[r] @ v1[w].t()
            silu = F.silu(gate)
            h = silu * up
            torch.mm(h, w2[w], out=y_PH[r])
            saved += [gate, up, silu, h]
        ctx.counts, ctx.ffn = counts, ffn
        ctx.save_for_backward(x_PH, w1, v1, w2, *saved)
        return y_PH

    @staticmethod
    def backward(ctx, grad_y_PH):
        x_PH, w1, v1, w2, *saved = ctx.saved_tensors
        counts, ffn = ctx.counts, ctx.ffn
        need_x, need_w1, need_v1, need_w2 = ctx.needs_input_grad[:4]
        grad_y_PH = grad_y_PH.contiguous()
        grad_x = x_PH.new_empty(x_PH.shape) if need_x else None
        grads_w = [_weight_grad(w, counts, ffn) if need else None
                   for w, need in ((w1, need_w1), (v1, need_v1), (w2, need_w2))]
        for i, (r, w) in enumerate(_blocks(counts, ffn)):
            gate, up, silu, h = saved[4 * i:4 * i + 4]
            grad_h = grad_y_PH[r] @ w2[w].t()
            if need_w2:
                torch.mm(h.t(), grad_y_PH[r], out=grads_w[2][w])
            grad_up = grad_h * silu
            grad_gate = torch.ops.aten.silu_backward(grad_h.mul_(up), gate)
            if need_w1:
                torch.mm(grad_gate.t(), x_PH[r], out=grads_w[0][w])
            if need_v1:
                torch.mm(grad_up.t(), x_PH[r], out=grads_w[1][w])
            if need_x:
                torch.mm(grad_gate, w1[w], out=grad_x[r])
                grad_x[r].addmm_(grad_up, v1[w])
        return grad_x, *grads_w, None


class PairGather(torch.autograd.Function):
    """x_PH = x_TH[token_idx_P]: one row per token-expert pair. Every token owns exactly K pairs,
    so the backward gathers each token's K pair rows (`inv_P`) and sums them (no scatter)."""

    @staticmethod
    def forward(ctx, x_TH, token_idx_P, inv_P, top_k: int):
        ctx.save_for_backward(inv_P)
        ctx.top_k = top_k
        return x_TH.index_select(0, token_idx_P)

    @staticmethod
    def backward(ctx, grad_PH):
        (inv_P,) = ctx.saved_tensors
        grad_TKH = grad_PH.index_select(0, inv_P).view(-1, ctx.top_k, grad_PH.shape[1])
        return grad_TKH.sum(dim=1), None, None, None


class WeightedPairSum(torch.autograd.Function):
    """out_TH[t] = Σ_k weight_TK[t, k] · y_PH[inv_P[t*K + k]] (pair rows back in token order,
    weighted and summed); the backward is again gathers."""

    @staticmethod
    def forward(ctx, y_PH, weight_TK, token_idx_P, order_P, inv_P):
        num_tokens, top_k = weight_TK.shape
        y_TKH = y_PH.index_select(0, inv_P).view(num_tokens, top_k, y_PH.shape[1])
        ctx.save_for_backward(y_TKH, weight_TK, token_idx_P, order_P)
        return torch.bmm(weight_TK.unsqueeze(1), y_TKH).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TH):
        y_TKH, weight_TK, token_idx_P, order_P = ctx.saved_tensors
        grad_TH = grad_TH.contiguous()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            weight_P = weight_TK.reshape(-1).index_select(0, order_P)
            grad_y = grad_TH.index_select(0, token_idx_P).mul_(weight_P[:, None])
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(y_TKH, grad_TH.unsqueeze(2)).squeeze(2)
        return grad_y, grad_w, None, None, None

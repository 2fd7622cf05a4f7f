"""MegaBlocks dropless MoE backend, fed with OUR parameters (`moe_backend="megablocks"`,
registered in `pipeline.registry.MOE_BACKENDS`; interface `pipeline.model.moe_backend.MoEBackend`).

We keep one parameter layout for both backends (router `[E, H]`, experts `w1/v1/w2 [E*F, H]`,
which is exactly MegaBlocks' GLU layout), so a checkpoint runs on either. MegaBlocks'
`ParallelDroplessMLP` (the expert half of `dMoE`, GLU experts, `mlp_impl="grouped"`) is built
once per layer on the meta device, its own weights are deleted, and before every call its GLU
module's `w1/v1/w2` attributes are pointed at slices of our parameters (autograd flows back into
ours). Routing is ours (`pipeline.model.routing.route`), so the `RouterOutput` is identical on
both backends; MegaBlocks only permutes, runs the grouped GEMMs and un-permutes.

Expert parallelism: MegaBlocks' own `expert_parallel_group` all-to-all; it needs E divisible by
the group size and gives rank r the experts [r*E/ep, (r+1)*E/ep) -- the same contiguous ranges
as our torch backend. Its default 1/ep gradient scaling is switched off so gradients mean the
same thing on both backends (see pipeline/model/expert_parallel.py).

Needs CUDA, `megablocks` with its compiled ops (`megablocks_ops`), `grouped_gemm` with its
(`grouped_gemm_backend`, bf16 grouped GEMMs) and `stk`: the pinned set
requirements-gpu-megablocks.txt (torch 2.7.0), built as the README's Install section says.
`check_available` (`pipeline.backends.require_megablocks`) imports each compiled extension, so a
build without them is one error naming the missing op and the build command, at stage start
(`require_moe_backend`) and before any layer exists; everything else is imported lazily.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model.moe_backend import MoEBackend
from . import require_megablocks

_GLU_WEIGHTS = ("w1", "v1", "w2")


def _megablocks_arguments(experts, top_k: int, group, ep_size: int):
    from megablocks.layers.arguments import Arguments
    return Arguments(
        hidden_size=experts.hidden_size, ffn_hidden_size=experts.ffn_size,
        moe_num_experts=experts.num_experts, moe_top_k=top_k,
        bias=False, return_bias=False, activation_fn=F.silu,
        mlp_type="glu", mlp_impl="grouped", memory_optimized_mlp=False,
        moe_expert_model_parallelism=ep_size > 1, expert_parallel_group=group,
        moe_loss_weight=0.0,                 # we compute load balancing ourselves (pipeline.train.fusion.losses)
        fp16=False, bf16=True,
        device=torch.device("meta"),         # its own weights are replaced by ours: allocate none
    )


class MegaBlocksBackend(MoEBackend):
    """MegaBlocks' dropless experts on our weights; expert parallelism by MegaBlocks' all-to-all
    over the layer's expert-parallel group."""
    needs_cuda = True           # grouped GEMMs on CUDA tensors only
    even_expert_split = True    # its all-to-all gives every rank E / ep experts

    @classmethod
    def check_available(cls) -> None:
        require_megablocks()

    def __init__(self, experts, top_k: int, expert_parallel=None):
        super().__init__(experts, top_k, expert_parallel)
        require_megablocks()
        from megablocks.layers.dmoe import ParallelDroplessMLP

        group = expert_parallel.group if expert_parallel is not None else None
        ep_size = dist.get_world_size(group) if group is not None else 1
        if experts.num_experts % ep_size:
            raise ValueError(f"megablocks expert parallelism needs num_experts divisible by the "
                             f"expert-parallel size: E={experts.num_experts}, ep={ep_size} "
                             f"(the torch backend handles uneven splits)")
        ep_rank = dist.get_rank(group) if group is not None else 0
        per_rank = experts.num_experts // ep_size
        self.rows = slice(ep_rank * per_rank * experts.ffn_size,
                          (ep_rank + 1) * per_rank * experts.ffn_size)
        self.layer = ParallelDroplessMLP(_megablocks_arguments(experts, top_k, group, ep_size))
        glu = self.layer.mlp
        for name in _GLU_WEIGHTS:
            delattr(glu, name)          # drop MegaBlocks' (meta) parameters; ours are bound per call
        glu.gradient_scale = None       # keep the torch backend's gradient semantics

    def _bind_weights(self, experts) -> None:
        glu = self.layer.mlp
        for name in _GLU_WEIGHTS:
            setattr(glu, name, getattr(experts, name)[self.rows])

    def forward(self, x_TH: torch.Tensor, routing, experts) -> torch.Tensor:
        if not x_TH.is_cuda:
            raise RuntimeError(f"moe_backend='megablocks' runs on CUDA tensors; got {x_TH.device} "
                               "(move the model to the GPU or use moe_backend='torch')")
        if x_TH.dtype != torch.bfloat16 or experts.w1.dtype != torch.bfloat16:
            raise ValueError(f"moe_backend='megablocks' (grouped GEMM) needs bf16 activations and "
                             f"expert weights; got {x_TH.dtype} / {experts.w1.dtype}")
        self._bind_weights(experts)
        x_S1H = x_TH.unsqueeze(1)      # MegaBlocks expects [seq, batch, hidden]
        out = self.layer(x_S1H, routing.probs_TE, routing.topk_weight_TK.to(x_TH.dtype),
                         routing.topk_idx_TK)
        if isinstance(out, tuple):     # (out, bias) when a version returns the bias separately
            out = out[0]
        return out.reshape(x_TH.shape)

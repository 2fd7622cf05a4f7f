"""The MoE block that replaces Llama's MLP: a router plus E stacked GLU experts.

Parameter layout (docs/contracts.md, MegaBlocks' GLU layout): `router.weight [E, H]`,
`experts.w1/v1/w2 [E*F, H]`; expert e owns rows e*F:(e+1)*F. One layout serves both backends,
so a checkpoint runs on either. `forward` returns `(output, RouterOutput)`: the routing decision
travels with the activations, never through module or global state, so it survives activation
checkpointing and several models in one process.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .configuration import MOE_BACKENDS
from .routing import RouterOutput, dropless_moe, route

_INIT_STD = 0.02


class GLUExperts(nn.Module):
    """E GLU experts stacked along rows: w1 = gate_proj, v1 = up_proj, w2 = down_proj.T."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        rows = num_experts * ffn_size
        self.w1 = nn.Parameter(torch.empty(rows, hidden_size))
        self.v1 = nn.Parameter(torch.empty(rows, hidden_size))
        self.w2 = nn.Parameter(torch.empty(rows, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = _INIT_STD) -> None:
        for w in (self.w1, self.v1, self.w2):
            nn.init.normal_(w, mean=0.0, std=std)

    def expert_rows(self, expert: int) -> slice:
        return slice(expert * self.ffn_size, (expert + 1) * self.ffn_size)

    def expert_params(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (not copies) of expert `expert`'s w1, v1, w2 rows."""
        rows = self.expert_rows(expert)
        return self.w1[rows], self.v1[rows], self.w2[rows]

    @torch.no_grad()
    def load_dense_mlp(self, expert: int, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                       down_proj: torch.Tensor) -> None:
        """Copy one Llama MLP (`*_proj.weight` tensors) into expert `expert`'s rows."""
        rows = self.expert_rows(expert)
        want = (self.ffn_size, self.hidden_size)
        for name, w, shape in (("gate_proj", gate_proj, want), ("up_proj", up_proj, want),
                               ("down_proj", down_proj, want[::-1])):
            if tuple(w.shape) != shape:
                raise ValueError(f"expert {expert}: {name}.weight has shape {tuple(w.shape)}, "
                                 f"expected {shape}")
        self.w1[rows].copy_(gate_proj)
        self.v1[rows].copy_(up_proj)
        self.w2[rows].copy_(down_proj.T)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, ffn={self.ffn_size}"


class H3FusionMoE(nn.Module):
    """Router (linear H->E, no bias) + dropless top-k GLU experts, on the configured backend."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GLUExperts(config.num_experts, config.hidden_size, config.intermediate_size)
        self.backend = "torch"
        # runtime-only expert-parallel state (pipeline.model.expert_parallel); never saved
        self.expert_parallel = None
        self._megablocks: list = []   # lazily built adapter; a list so it is not a submodule
        self.set_backend(config.moe_backend)

    def set_backend(self, backend: str) -> None:
        if backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend must be one of {MOE_BACKENDS}, got {backend!r}")
        if backend == "megablocks":
            from ..backends import require_megablocks
            require_megablocks()
        self.backend = backend
        self._megablocks.clear()

    def forward(self, hidden_BSH: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        batch, seq, hidden = hidden_BSH.shape
        x_TH = hidden_BSH.reshape(batch * seq, hidden)
        if self.backend == "megablocks":
            out_TH, routing = self._megablocks_forward(x_TH)
        elif self.expert_parallel is not None:
            out_TH, routing = self.expert_parallel.forward(self, x_TH)
        else:
            e = self.experts
            out_TH, routing = dropless_moe(x_TH, self.router.weight, e.w1, e.v1, e.w2, self.top_k)
        return out_TH.view(batch, seq, hidden), routing

    def _megablocks_forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        if not self._megablocks:
            from ..backends.megablocks_moe import MegaBlocksExperts
            group = self.expert_parallel.group if self.expert_parallel is not None else None
            self._megablocks.append(MegaBlocksExperts(self.experts, self.top_k, group))
        routing = route(x_TH, self.router.weight, self.top_k)
        return self._megablocks[0](x_TH, routing), routing


def moe_layers(model: nn.Module) -> list[H3FusionMoE]:
    return [m for m in model.modules() if isinstance(m, H3FusionMoE)]


def set_moe_backend(model: nn.Module, backend: str) -> None:
    """Switch every MoE layer (and the config) to `backend`; fails fast if it cannot run here."""
    for layer in moe_layers(model):
        layer.set_backend(backend)
    config: Optional[object] = getattr(model, "config", None)
    if config is not None:
        config.moe_backend = backend

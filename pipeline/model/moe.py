"""The MoE block that replaces Llama's MLP: a router plus E stacked GLU experts.

Parameter layout (docs/contracts.md, MegaBlocks' GLU layout): `router.weight [E, H]`,
`experts.w1/v1/w2 [E*F, H]`; expert e owns rows e*F:(e+1)*F. One layout serves every backend,
so a checkpoint runs on any. Routing is computed here (identical on every backend); the expert
half runs on the backend named by `config.moe_backend` (`pipeline.registry.MOE_BACKENDS`,
interface `pipeline.model.moe_backend.MoEBackend`). `forward` returns `(output, RouterOutput)`:
the routing decision travels with the activations, never through module or global state, so it
survives activation checkpointing and several models in one process.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..registry import MOE_BACKENDS
from .routing import RouterOutput, route

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
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GLUExperts(config.num_experts, config.hidden_size, config.intermediate_size)
        # runtime-only state, never saved: expert-parallel group (set_expert_parallel) and the
        # backend instance (a plain object, not a submodule), built on first forward
        self.expert_parallel = None
        self._backend_impl = None
        self.set_backend(config.moe_backend)

    def set_backend(self, backend: str) -> None:
        """Run the experts on registered backend `backend`; fails fast if it cannot run here."""
        self._backend_cls = MOE_BACKENDS.get(backend, "moe_backend")
        self._backend_cls.check_available()
        self.backend = backend
        self._backend_impl = None

    def set_expert_parallel(self, expert_parallel) -> None:
        """Set (an `ExpertParallel`) or clear (None) this layer's expert-parallel state."""
        self.expert_parallel = expert_parallel
        self._backend_impl = None   # a backend binds the group when it is built

    def forward(self, hidden_BSH: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        batch, seq, hidden = hidden_BSH.shape
        x_TH = hidden_BSH.reshape(batch * seq, hidden)
        if self._backend_impl is None:
            self._backend_impl = self._backend_cls(self.experts, self.top_k, self.expert_parallel)
        routing = route(x_TH, self.router.weight, self.top_k)
        out_TH = self._backend_impl.forward(x_TH, routing, self.experts)
        return out_TH.view(batch, seq, hidden), routing


def moe_layers(model: nn.Module) -> list[H3FusionMoE]:
    return [m for m in model.modules() if isinstance(m, H3FusionMoE)]


def set_moe_backend(model: nn.Module, backend: str) -> None:
    """Switch every MoE layer (and the config) to `backend`; fails fast if it cannot run here."""
    for layer in moe_layers(model):
        layer.set_backend(backend)
    config: Optional[object] = getattr(model, "config", None)
    if config is not None:
        config.moe_backend = backend

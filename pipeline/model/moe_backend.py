"""The MoE backend interface and the pure-PyTorch dropless backend.

A backend computes the expert half of one MoE layer: the router has already chosen each
token's experts (`RouterOutput`, identical on every backend), the backend returns the weighted
sum of the chosen experts' GLU outputs. Backends are registered by name in
`pipeline.registry.MOE_BACKENDS`; `H3FusionMoE` builds one instance per layer on its first
forward and drops it when the layer's backend or expert-parallel group changes.

A new backend = a module with a `MoEBackend` subclass + one line in `MOE_BACKENDS`. Heavy or
optional dependencies are imported inside the backend (only `pipeline/backends/` may import
DeepSpeed or MegaBlocks); `check_available` names what a machine lacks before any model exists.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .routing import RouterOutput, dropless_experts

if TYPE_CHECKING:   # annotations only: moe.py imports this module
    from .expert_parallel import ExpertParallel
    from .moe import GLUExperts


class MoEBackend:
    """Expert computation of one MoE layer; one instance per layer, built lazily.

    `experts` and `top_k` give the layer's shapes; `expert_parallel` is the layer's runtime
    expert-parallel state (None: every expert is computed locally). `forward` receives the
    layer's current `GLUExperts` on every call: read weights from it, never cache them.
    What a backend needs is read from its class, never from its name: `needs_cuda` (runs only on
    CUDA GPUs: refused before a CPU run starts), `even_expert_split` (expert parallelism needs
    the experts divisible by fusion.ep_degree).
    """
    needs_cuda = False
    even_expert_split = False

    @classmethod
    def check_available(cls) -> None:
        """Raise RuntimeError naming what this machine lacks to run the backend."""

    def __init__(self, experts: "GLUExperts", top_k: int,
                 expert_parallel: Optional["ExpertParallel"] = None):
        self.top_k = top_k
        self.expert_parallel = expert_parallel

    def forward(self, x_TH: torch.Tensor, routing: RouterOutput,
                experts: "GLUExperts") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.forward")


class TorchBackend(MoEBackend):
    """Pure-PyTorch dropless experts (any device and dtype); expert parallelism by all-to-all
    (`ExpertParallel.dispatch`)."""

    def forward(self, x_TH: torch.Tensor, routing: RouterOutput,
                experts: "GLUExperts") -> torch.Tensor:
        if self.expert_parallel is not None:
            return self.expert_parallel.dispatch(x_TH, routing, experts)
        return dropless_experts(x_TH, routing, experts.w1, experts.v1, experts.w2)

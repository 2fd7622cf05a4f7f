"""Expert parallelism for the torch backend: tokens travel to the rank that owns their expert.

Ownership: the E experts are split into `ep` contiguous ranges (sizes differ by at most one, so
E=3 works on 2 ranks). Parameters are NOT sliced: every rank keeps the full stacked
`w1/v1/w2 [E*F, H]`, but computes only its own experts' rows. Consequences, by design:
- save/load always see the full layout (any rank's state_dict is a complete checkpoint once
  replicas are in sync);
- a rank's gradient for a non-owned expert is zero, and the owner's gradient already contains
  the contributions of every rank's tokens (the all-to-all's backward brings them home). Averaging
  gradients over the data-parallel group (what DDP / DeepSpeed ZeRO do anyway) therefore yields
  exactly the gradient of the global mean loss and keeps all replicas identical.
The price is memory: each rank stores all E experts (fine for H3Fusion's E=3; slice the params
if E grows large).

Dispatch per MoE layer (P = local token-expert pairs; the layer has already routed):
permute by expert (so pairs for each destination rank are contiguous) -> all-gather the
per-expert counts -> all_to_all_single (autograd-aware) -> regroup received rows by local
expert -> GLU experts -> undo the regrouping -> all_to_all_single back -> weighted unpermute.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from .routing import RouterOutput, expert_glu, permute, unpermute

# the autograd-aware functional all_to_all_single is what we want; its deprecation notice (in
# favour of a private module) would otherwise print on every first call per process
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"torch\.distributed\.nn\.functional\.all_to_all_single is deprecated")


def expert_ranges(num_experts: int, ep_size: int) -> list[tuple[int, int]]:
    """[start, end) expert range owned by each EP rank: contiguous, balanced to within one."""
    if not 1 <= ep_size <= num_experts:
        raise ValueError(f"expert-parallel size must be in [1, num_experts={num_experts}], "
                         f"got {ep_size}")
    base, extra = divmod(num_experts, ep_size)
    ranges, start = [], 0
    for rank in range(ep_size):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass
class ExpertParallel:
    """Runtime EP state of one MoE layer (a process group is never serialised)."""
    group: dist.ProcessGroup
    num_experts: int

    def __post_init__(self):
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.ranges = expert_ranges(self.num_experts, self.size)

    @property
    def local_experts(self) -> tuple[int, int]:
        return self.ranges[self.rank]

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_RE[r, e]: how many pairs rank r sends to expert e."""
        gathered = [torch.empty_like(counts_E) for _ in range(self.size)]
        dist.all_gather(gathered, counts_E.contiguous(), group=self.group)
        return torch.stack(gathered)

    def dispatch(self, x_TH: torch.Tensor, routing: RouterOutput, experts) -> torch.Tensor:
        """The expert half of the layer for already-routed tokens (the torch backend's EP path)."""
        x_PH, perm = permute(x_TH, routing.topk_idx_TK)
        counts_RE = self._exchange_counts(routing.tokens_per_expert_E)
        lo, hi = self.local_experts
        send_splits = [int(counts_RE[self.rank, a:b].sum()) for a, b in self.ranges]
        recv_counts_RL = counts_RE[:, lo:hi]
        recv_splits = recv_counts_RL.sum(dim=1).tolist()
        x_recv = all_to_all_single(x_PH.new_empty(sum(recv_splits), x_PH.shape[1]), x_PH,
                                   recv_splits, send_splits, group=self.group)
        y_recv = self._local_experts(experts, x_recv, recv_counts_RL)
        y_PH = all_to_all_single(x_PH.new_empty(x_PH.shape), y_recv, send_splits, recv_splits,
                                 group=self.group)
        return unpermute(y_PH, perm, routing.topk_weight_TK, x_TH.shape[0])

    def _local_experts(self, experts, x_recv: torch.Tensor,
                       recv_counts_RL: torch.Tensor) -> torch.Tensor:
        """Received rows come as [source rank][local expert] blocks; regroup by expert, compute,
        and return the results in the received order."""
        lo, hi = self.local_experts
        num_local = hi - lo
        local_id = torch.arange(num_local, device=x_recv.device).repeat(self.size)
        row_expert = torch.repeat_interleave(local_id, recv_counts_RL.reshape(-1).to(x_recv.device))
        order = torch.argsort(row_expert, stable=True)
        rows = slice(lo * experts.ffn_size, hi * experts.ffn_size)
        y_sorted = expert_glu(x_recv.index_select(0, order), recv_counts_RL.sum(dim=0),
                              experts.w1[rows], experts.v1[rows], experts.w2[rows])
        return y_sorted.index_select(0, torch.argsort(order))


def apply_expert_parallel(model: torch.nn.Module, ep_group: dist.ProcessGroup | None) -> int:
    """Shard every MoE layer's experts over `ep_group` (None or a 1-rank group: undo).

    Returns the number of MoE layers changed. The caller builds the group, e.g.
    `dist.new_group(ranks)` over consecutive ranks; all ranks of a group must hold identical
    parameters (load the same checkpoint) and see the same config.
    """
    from .moe import moe_layers
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no H3FusionMoE layers to shard")
    single = ep_group is None or dist.get_world_size(ep_group) == 1
    for layer in layers:
        layer.set_expert_parallel(None if single else ExpertParallel(ep_group, layer.num_experts))
    return len(layers)

"""Ensemble method "avg" (pipeline.registry.ENSEMBLES): probability averaging. At every position
the next-token distribution is the mean of the members' probabilities; the ensemble's `logits` are
the log of that mean (log-softmax normalised), so log-likelihood scoring and greedy / sampled
generation are exactly those of the averaged distribution. Nothing to build beyond the config."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .method import EnsembleBuild, MixingMethod


class Average(MixingMethod):
    def build(self, build: EnsembleBuild) -> dict:
        return {}

    def mix(self, model, member_logits: Iterable[torch.Tensor]) -> torch.Tensor:
        """log(mean_i softmax(l_i)) in float32, accumulated one member at a time (memory: two
        [B, T, V] tensors) as logsumexp_i log_softmax(l_i) - log(n)."""
        total, n = None, 0
        for logits in member_logits:
            logp = torch.log_softmax(logits.float(), dim=-1)
            total = logp if total is None else torch.logaddexp(total, logp)
            n += 1
            del logits, logp
        if total is None:
            raise ValueError("avg ensemble: no member logits to average")
        return total - math.log(n)

    def mix_target_ll(self, model, member_ll: Sequence[torch.Tensor]) -> torch.Tensor:
        """log mean_i p_i(target) per token = logsumexp_i log p_i(target) - log n, which is the
        averaged distribution's log-prob (each member's softmax is normalised alone)."""
        return torch.logsumexp(torch.stack(list(member_ll)), dim=0) - math.log(len(member_ll))


AVG = Average()

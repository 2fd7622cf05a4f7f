"""What an ensemble method is: the entries of pipeline.registry.ENSEMBLES are instances of the
classes below, one per method, each in its own module (`avg`, `router`, `oracle`).

A method is one of two kinds, and the ensemble model (pipeline.ensemble.modeling), the `ensemble`
stage (pipeline.ensemble.stage) and the evaluation (pipeline.eval.scoring / generation / routing,
which reach it through the loaded model or the registry only) dispatch on the kind and call the
method's hooks; none of them compares a method's name.

- `MixingMethod`: every member runs on every token; the next-token distribution mixes theirs
  (`mix`: from the members' logits, for forward and generation; `mix_target_ll`: from the members'
  log-probs of given targets, for packed scoring).
- `RoutingMethod` (`per_prompt`): each sequence runs on ONE member, chosen from its prompt: the
  last `prompt_window` tokens up to the response marker (pipeline.ensemble.classifier.prompt_tokens).
  `choose` picks per window; its builder returns the marker (manifest key "marker").

Every method: `build` writes its own files into the ensemble dir and returns its manifest entries;
`load` reads them back (`from_pretrained`) and `attach` checks them against the config and keeps
them on the model; `check_items` is its check of the evaluation's items before any model loads.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..layout import RunLayout


@dataclasses.dataclass(frozen=True)
class EnsembleBuild:
    """What a method's builder gets: the whole PipelineConfig, the run, the temp dir it writes its
    files into, the tokenizer dir and the members' vocab size."""
    cfg: Any
    run: RunLayout
    tmp: Path
    tokenizer_dir: Path
    vocab: int


class EnsembleMethod:
    """The hooks every method has (the kinds below add theirs)."""

    per_prompt = False        # True: one member per sequence, chosen from its prompt
    reports_routing = False   # True: the evaluation reports its choice per eval item (`route_items`)
    ceiling = False           # True: knows what a baseline cannot (reported, never a claim-(c) baseline)

    def build(self, build: EnsembleBuild) -> dict:
        """Write the method's files into `build.tmp`; return its manifest entries (+ "marker":
        the response marker's token ids, for a per-prompt method)."""
        raise NotImplementedError(f"{type(self).__name__} does not define build()")

    def load(self, root: Path, config) -> Any:
        """The method's state read from its ensemble dir (`from_pretrained`); None: it has none."""
        return None

    def attach(self, model, state: Any) -> None:
        """Check `state` against the model's config and keep it on the model (`__init__`)."""
        if state is not None:
            raise ValueError(f"{model.config.method} ensemble: takes no state, got {type(state).__name__}")

    def check_items(self, root: Path, items: dict[str, list[dict]], tokenizer_dir: Path | None) -> None:
        """Before any model loads: a ValueError when the ensemble in `root` cannot serve the
        evaluation's items (dimension -> eval items)."""


class MixingMethod(EnsembleMethod):
    """Every member on every token; the mixture's next-token log-probs."""

    def mix(self, model, member_logits: Iterable[torch.Tensor]) -> torch.Tensor:
        """float32 log-probs [..., V] of the mixture from each member's logits [..., V], consumed
        one member at a time (the ensemble's forward and the greedy decoder pass a generator);
        `model`: the ensemble, with the state `attach` kept on it."""
        raise NotImplementedError(f"{type(self).__name__} does not define mix()")

    def mix_target_ll(self, model, member_ll: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mixture's log-prob of each target token [N] from each member's log-prob of it [N]
        (packed scoring runs the LM head on the scored positions only)."""
        raise NotImplementedError(f"{type(self).__name__} does not define mix_target_ll()")


class RoutingMethod(EnsembleMethod):
    """One member per sequence, chosen from its prompt window."""

    per_prompt = True

    def choose(self, model, windows: Sequence[Sequence[int]]) -> list[int]:
        """Member index per prompt window, with the state `attach` kept on `model`."""
        raise NotImplementedError(f"{type(self).__name__} does not define choose()")

    def route_items(self, root: Path, tokenizer, items: Sequence[dict]) -> list[int]:
        """Member index per eval item from its Alpaca prompt, read from the dir without loading
        the members (the evaluation's routing report: methods with `reports_routing`)."""
        raise NotImplementedError(f"{type(self).__name__} does not define route_items()")

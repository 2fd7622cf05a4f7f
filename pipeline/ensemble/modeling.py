"""LLM-ensemble baselines as one Hugging Face causal LM: `EnsembleForCausalLM` (model_type
"h3fusion_ensemble") over member model directories.

The method (`config.method`, an entry of pipeline.registry.ENSEMBLES: pipeline.ensemble.method)
decides what the members' outputs become: a mixing method ("avg": pipeline.ensemble.avg) combines
every member's next-token distribution at every position (`mix`); a per-prompt method ("router",
"oracle") runs each sequence on ONE member chosen from its prompt window (`choose`), and `logits`
are that member's logits.

An ensemble dir holds config.json (members by path, relative to the dir or absolute), the
tokenizer, and the method's own files (the router's classifier, the oracle's table: its `load`
hook reads them); member weights stay in the members' own dirs. `from_pretrained` loads the members, so
`AutoModelForCausalLM.from_pretrained(dir)` (and pipeline.eval.models.load_causal_lm) work once
this package is imported.

Generation keeps one KV cache per member (`EnsembleCache`, returned as `past_key_values`; HF
generate() passes it back and feeds only the new token), so each member decodes as it would
alone. `generation_config.use_cache=False` recomputes the whole sequence at every step instead
(same tokens; a test checks it). Plain forward calls (scoring) use no cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..registry import ENSEMBLES
from .classifier import PROMPT_WINDOW, prompt_tokens


@strict
class EnsembleConfig(PretrainedConfig):
    model_type = "h3fusion_ensemble"

    method: str = "avg"                         # a pipeline.registry.ENSEMBLES name
    members: list[str] | None = None            # member model dirs (relative to the ensemble dir or absolute)
    member_names: list[str] | None = None       # one name per member (the router's class names)
    response_marker_ids: list[int] | None = None  # per-prompt methods: prompt/response boundary
    prompt_window: int = PROMPT_WINDOW          # per-prompt methods: prompt tokens the choice reads
    vocab_size: int = 0

    def check_ensemble(self, where: str = "ensemble config") -> None:
        method = ENSEMBLES.get(self.method, f"{where}: method")
        if not self.members or len(self.members) < 2:
            raise ValueError(f"{where}: members must list at least two model dirs, got {self.members}")
        if self.member_names is None or len(self.member_names) != len(self.members):
            raise ValueError(f"{where}: member_names must name each of the {len(self.members)} members")
        if method.per_prompt and not self.response_marker_ids:
            raise ValueError(f"{where}: a {self.method} ensemble needs response_marker_ids")


def resolve_member(root: Path, member: str) -> Path:
    path = Path(member)
    return path if path.is_absolute() else (root / path).resolve()


def _load_member(path: Path, dtype):
    from transformers import AutoModelForCausalLM
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"ensemble member is not a model dir (no config.json): {path}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


class EnsembleCache:
    """The members' KV caches across generate() steps, and the router's per-row choice (made
    once, from the prompt, at the first step). Not a transformers `Cache`: generate() only
    stores it, passes it back, and asks its length."""

    def __init__(self, num_members: int):
        self.caches: list = [None] * num_members
        self.choice: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next((c.get_seq_length() for c in self.caches if c is not None), 0)


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"

    def __init__(self, config: EnsembleConfig, members: list | None = None, state: Any = None):
        """`state`: what the method's `load` hook reads from the dir (the router's classifier,
        the oracle's table; None for "avg")."""
        super().__init__(config)
        config.check_ensemble()
        if members is None or len(members) != len(config.members):
            raise ValueError("EnsembleForCausalLM needs its loaded members (use from_pretrained)")
        self.members = nn.ModuleList(members)
        self.ensemble_method = ENSEMBLES.get(config.method, "ensemble config: method")
        self.ensemble_method.attach(self, state)
        config.use_cache = False   # plain forward calls (scoring) keep no cache
        self.generation_config = GenerationConfig(
            use_cache=True, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id)
        self.post_init()

    def save_pretrained(self, *args, **kwargs):
        raise ValueError("an ensemble dir holds a config that points at its members, not their "
                         "weights: build it with `h3fusion ensemble` (pipeline.ensemble.stage)")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # one DynamicCache cannot hold several models: forward makes an EnsembleCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, **kwargs):
        """Load the members from their dirs (hub keyword arguments are ignored: local dirs only)."""
        root = Path(pretrained_model_name_or_path)
        config = config if config is not None else EnsembleConfig.from_pretrained(root)
        config.check_ensemble(str(root / "config.json"))
        paths = [resolve_member(root, m) for m in config.members]
        missing = [str(p) for p in paths if not (p / "config.json").is_file()]
        if missing:   # every missing member in one error, before loading any
            raise FileNotFoundError(f"{root}: ensemble member dir(s) missing (no config.json): {missing}")
        members = [_load_member(p, dtype) for p in paths]
        state = ENSEMBLES.get(config.method, str(root / "config.json")).load(root, config)
        return cls(config, members, state).eval()

    @property
    def routes_per_prompt(self) -> bool:
        """True when each sequence runs on one member chosen from its prompt (router, oracle)."""
        return self.ensemble_method.per_prompt

    def mix(self, member_logits: Iterable[torch.Tensor]) -> torch.Tensor:
        """A mixing method's float32 next-token log-probs from the members' logits (its `mix`)."""
        return self.ensemble_method.mix(self, member_logits)

    def mix_target_ll(self, member_ll: Sequence[torch.Tensor]) -> torch.Tensor:
        """A mixing method's log-prob of each target from the members' (its `mix_target_ll`)."""
        return self.ensemble_method.mix_target_ll(self, member_ll)

    def choose_members(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] member index per sequence from its prompt tokens only (per-prompt methods)."""
        seqs = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        return torch.tensor(self.choose_for_sequences(seqs), dtype=torch.long, device=input_ids.device)

    def choose_for_sequences(self, seqs: list[list[int]]) -> list[int]:
        """Member index per unpadded token sequence, from its prompt tokens only (router, oracle;
        packed scoring calls this directly on its requests' prompt parts)."""
        if not self.routes_per_prompt:
            raise ValueError(f"choose_for_sequences: a {self.config.method!r} ensemble chooses no member")
        marker = list(self.config.response_marker_ids)
        windows = [prompt_tokens(s, marker, self.config.prompt_window) for s in seqs]
        return self.ensemble_method.choose(self, windows)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool | None = None, labels=None, logits_to_keep: int = 0,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if labels is not None:
            raise ValueError("EnsembleForCausalLM is for evaluation only: labels are not supported")
        cache = None
        if use_cache:
            cache = past_key_values if isinstance(past_key_values, EnsembleCache) else \
                EnsembleCache(len(self.members))
        if attention_mask is None:   # (generate() drops an all-ones mask) cached tokens + new ones
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = input_ids.new_ones((input_ids.shape[0], past + input_ids.shape[1]))
        if attention_mask.ndim != 2:
            raise ValueError("EnsembleForCausalLM takes a 2-D attention mask (padding mask) only")
        if position_ids is None:   # left or right padding: positions count the real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids.shape[-1] != input_ids.shape[-1]:   # cached steps: the new tokens' positions
            position_ids = position_ids[..., -input_ids.shape[-1]:]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.routes_per_prompt:
            logits = self._route(inputs, logits_to_keep, cache)
        else:   # a generator: the method mixes one member's logits at a time
            logits = self.mix(self._run(m, inputs, logits_to_keep, cache)
                              for m in range(len(self.members)))
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _run(self, m: int, inputs: dict, logits_to_keep: int, cache: EnsembleCache | None):
        if cache is None:
            return self.members[m](**inputs, use_cache=False, logits_to_keep=logits_to_keep).logits
        out = self.members[m](**inputs, past_key_values=cache.caches[m], use_cache=True,
                              logits_to_keep=logits_to_keep)
        cache.caches[m] = out.past_key_values
        return out.logits

    def _route(self, inputs: dict, logits_to_keep: int, cache: EnsembleCache | None) -> torch.Tensor:
        """Each row's logits from its chosen member; members run only on their rows (with a
        cache the rows and their choice stay fixed from the first, full-prompt step)."""
        if cache is not None and cache.choice is not None:
            choice = cache.choice
        else:
            choice = self.choose_members(inputs["input_ids"], inputs["attention_mask"])
            if cache is not None:
                cache.choice = choice
        logits = None
        for m in choice.unique().tolist():
            rows = (choice == m).nonzero(as_tuple=True)[0]
            sub = {k: v[rows] for k, v in inputs.items()}
            out = self._run(m, sub, logits_to_keep, cache).float()
            if logits is None:
                logits = out.new_zeros((choice.shape[0], *out.shape[1:]))
            logits[rows] = out
        return logits


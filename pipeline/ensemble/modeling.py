"""LLM-ensemble baselines as one Hugging Face causal LM: `EnsembleForCausalLM` (model_type
"h3fusion_ensemble") over member model directories.

- method "avg": at every position the next-token distribution is the mean of the members'
  probabilities; `logits` = log of that mean (log-softmax normalised), so log-likelihood scoring
  and greedy / sampled generation are exactly those of the averaged distribution.
- method "router": each sequence is run by ONE member, chosen from its prompt by the prompt
  classifier (pipeline.ensemble.classifier); `logits` = that member's logits.
- method "oracle": as "router", but the member is looked up: each eval prompt's own dimension
  (pipeline.ensemble.oracle); a prompt not in the table is an error.

An ensemble dir holds config.json (members by path, relative to the dir or absolute), the
tokenizer, and for the router `router_classifier.safetensors` (the oracle: `oracle_routes.json`);
member weights stay in the members' own dirs. `from_pretrained` loads the members, so
`AutoModelForCausalLM.from_pretrained(dir)` (and pipeline.eval.models.load_causal_lm) work once
this package is imported.

Generation keeps one KV cache per member (`EnsembleCache`, returned as `past_key_values`; HF
generate() passes it back and feeds only the new token), so each member decodes as it would
alone. `generation_config.use_cache=False` recomputes the whole sequence at every step instead
(same tokens; a test checks it). Plain forward calls (scoring) use no cache.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..registry import ENSEMBLES
from .classifier import PROMPT_WINDOW, PromptClassifier, prompt_tokens
from .oracle import OracleRoutes, load_oracle

ENSEMBLE_METHODS = ENSEMBLES.names()
# methods that run one member per sequence, chosen from its prompt (the others average)
PER_PROMPT_METHODS = ("router", "oracle")
CLASSIFIER_FILE = "router_classifier.safetensors"


@strict
class EnsembleConfig(PretrainedConfig):
    model_type = "h3fusion_ensemble"

    method: str = "avg"                         # one of ENSEMBLE_METHODS (pipeline.registry.ENSEMBLES)
    members: list[str] | None = None            # member model dirs (relative to the ensemble dir or absolute)
    member_names: list[str] | None = None       # one name per member (the router's class names)
    response_marker_ids: list[int] | None = None  # router/oracle: the prompt/response boundary (token ids)
    prompt_window: int = PROMPT_WINDOW          # router/oracle: prompt tokens the choice reads
    vocab_size: int = 0

    def check_ensemble(self, where: str = "ensemble config") -> None:
        if self.method not in ENSEMBLE_METHODS:
            raise ValueError(f"{where}: method must be one of {ENSEMBLE_METHODS}, got {self.method!r}")
        if not self.members or len(self.members) < 2:
            raise ValueError(f"{where}: members must list at least two model dirs, got {self.members}")
        if self.member_names is None or len(self.member_names) != len(self.members):
            raise ValueError(f"{where}: member_names must name each of the {len(self.members)} members")
        if self.method in PER_PROMPT_METHODS and not self.response_marker_ids:
            raise ValueError(f"{where}: a {self.method} ensemble needs response_marker_ids")


def resolve_member(root: Path, member: str) -> Path:
    path = Path(member)
    return path if path.is_absolute() else (root / path).resolve()


def _load_member(path: Path, dtype):
    from transformers import AutoModelForCausalLM
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"ensemble member is not a model dir (no config.json): {path}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_classifier(root: Path) -> PromptClassifier:
    from safetensors.torch import load_file
    path = root / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"router ensemble without its classifier: {path}")
    state = load_file(str(path))
    return PromptClassifier(state["weight"], state["bias"])


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

    def __init__(self, config: EnsembleConfig, members: list | None = None,
                 classifier: PromptClassifier | None = None, oracle: OracleRoutes | None = None):
        super().__init__(config)
        config.check_ensemble()
        if members is None or len(members) != len(config.members):
            raise ValueError("EnsembleForCausalLM needs its loaded members (use from_pretrained)")
        self.members = nn.ModuleList(members)
        if config.method == "router":
            if classifier is None or classifier.num_classes != len(members):
                raise ValueError(f"router ensemble: a classifier over {len(members)} members is needed")
            # buffers: they follow the model to its device
            self.register_buffer("router_weight", classifier.weight.clone(), persistent=False)
            self.register_buffer("router_bias", classifier.bias.clone(), persistent=False)
        self.oracle = oracle
        if config.method == "oracle":
            _check_oracle(oracle, config)
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
        classifier = load_classifier(root) if config.method == "router" else None
        oracle = load_oracle(root) if config.method == "oracle" else None
        return cls(config, members, classifier, oracle).eval()

    @property
    def routes_per_prompt(self) -> bool:
        """True when each sequence runs on one member chosen from its prompt (router, oracle)."""
        return self.config.method in PER_PROMPT_METHODS

    def choose_members(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] member index per sequence from its prompt tokens only (router)."""
        seqs = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        return torch.tensor(self.choose_for_sequences(seqs), dtype=torch.long, device=input_ids.device)

    def choose_for_sequences(self, seqs: list[list[int]]) -> list[int]:
        """Member index per unpadded token sequence, from its prompt tokens only (router, oracle;
        packed scoring calls this directly on its requests' prompt parts)."""
        if not self.routes_per_prompt:
            raise ValueError(f"choose_for_sequences: a {self.config.method!r} ensemble chooses no member")
        marker = list(self.config.response_marker_ids)
        windows = [prompt_tokens(s, marker, self.config.prompt_window) for s in seqs]
        if self.config.method == "oracle":
            return self.oracle.choose(windows, self._decode)
        return PromptClassifier(self.router_weight.cpu(), self.router_bias.cpu()).predict(windows)

    def _decode(self, ids: list[int]) -> str:
        """Token ids as text with the tokenizer beside the oracle's table (for its error message)."""
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(Path(self.oracle.source).parent)).decode(ids)
        except (OSError, ValueError):   # no tokenizer there: the ids themselves
            return f"token ids {ids}"

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
        if self.config.method == "avg":
            logits = self._average(inputs, logits_to_keep, cache)
        else:
            logits = self._route(inputs, logits_to_keep, cache)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _run(self, m: int, inputs: dict, logits_to_keep: int, cache: EnsembleCache | None):
        if cache is None:
            return self.members[m](**inputs, use_cache=False, logits_to_keep=logits_to_keep).logits
        out = self.members[m](**inputs, past_key_values=cache.caches[m], use_cache=True,
                              logits_to_keep=logits_to_keep)
        cache.caches[m] = out.past_key_values
        return out.logits

    def _average(self, inputs: dict, logits_to_keep: int, cache: EnsembleCache | None) -> torch.Tensor:
        """log(mean_i softmax(l_i)) in float32, accumulated one member at a time (memory: two
        [B, T, V] tensors) as logsumexp_i log_softmax(l_i) - log(n)."""
        total = None
        for m in range(len(self.members)):
            logp = torch.log_softmax(self._run(m, inputs, logits_to_keep, cache).float(), dim=-1)
            total = logp if total is None else torch.logaddexp(total, logp)
            del logp
        return total - math.log(len(self.members))

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


def _check_oracle(oracle: OracleRoutes | None, config: EnsembleConfig) -> None:
    """The oracle's table must route over the members, with the config's window and marker."""
    if oracle is None:
        raise ValueError("oracle ensemble: its routing table is needed (use from_pretrained)")
    if oracle.names != list(config.member_names):
        raise ValueError(f"oracle ensemble {oracle.source}: its dimensions {oracle.names} are not "
                         f"the members {config.member_names}")
    if oracle.window != config.prompt_window or oracle.marker != list(config.response_marker_ids):
        raise ValueError(f"oracle ensemble {oracle.source}: prompt window / response marker "
                         f"differ from config.json's")

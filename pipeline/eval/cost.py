"""What each evaluated model costs to serve: parameters active per token, forward FLOPs per token,
and the tokens/s the evaluator measured while scoring and generating with it (docs/evaluation.md,
"Cost per model").

Parameters are counted from the loaded model's modules, classified as
- `embedding`: the input token table; `lm_head`: the output projection (H x V; when tied to the
  embedding it is the same tensor, stored once),
- `matmul`: every other nn.Linear weight (attention projections, dense MLP, the MoE router),
- `expert`: the MoE's stacked GLU expert weights (pipeline.model.moe.GLUExperts), of which
  `num_experts_per_tok` of `num_experts` (H3FusionConfig) run per token,
- `other`: norms and biases (stored and active, no matmul).
An ensemble (pipeline.ensemble.modeling) is counted from its members: "avg" runs every member on
every token (sums); "router" and "oracle" (`routes_per_prompt`) run one member per prompt (the
largest member's cost) plus, for the router, its prompt classifier, a [vocab, C] lookup table
counted like an embedding (the oracle's prompt -> dimension table holds no parameters).

Forward FLOPs per token (a multiply-add = 2 FLOPs):
    2 * active matmul params + 2 * H * V (lm_head) + 4 * n_layers * L * d_attn
where d_attn = num_attention_heads * head_dim and L = the context a token attends to (the report
uses the evaluator's sequence cap: an upper bound). The last term is q.k over L keys plus the
attention-weighted sum of L values. Not counted: norms, softmax, rotary, activations and the
ensemble's averaging of V logits (linear in H or V per token, not H^2 or H*V), and the router
classifier's per-prompt sum of at most PROMPT_WINDOW table rows.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..timing import load_avg_1m, sync

SCORING, GENERATION = "scoring", "generation"


@dataclass(frozen=True)
class ParamCounts:
    """One model's parameters by role. `lm_head` is the output projection's size (its FLOPs),
    `lm_head_stored` its own storage (0 when tied to the embedding); `expert_active` = the
    experts' share run per token; `idle` = stored weights no token runs (the members a routed
    ensemble does not pick); `attn_width` = sum over layers of num_heads * head_dim."""
    embedding: int = 0
    lm_head: int = 0
    lm_head_stored: int = 0
    matmul: int = 0
    expert_stored: int = 0
    expert_active: int = 0
    other: int = 0
    classifier: int = 0
    idle: int = 0
    attn_width: int = 0

    @property
    def tied(self) -> bool:
        return self.lm_head > 0 and self.lm_head_stored == 0

    @property
    def stored(self) -> int:
        return (self.embedding + self.lm_head_stored + self.matmul + self.expert_stored
                + self.other + self.classifier + self.idle)

    @property
    def active_matmul(self) -> int:
        return self.matmul + self.expert_active

    @property
    def active_non_embedding(self) -> int:
        return self.active_matmul + self.other

    @property
    def active_with_embeddings(self) -> int:
        return self.active_non_embedding + self.embedding + self.lm_head_stored + self.classifier


def flops_per_token(c: ParamCounts, context_len: int) -> dict[str, int]:
    """Forward FLOPs per token at `context_len` attended positions (module docstring)."""
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    parts = {"matmul": 2 * c.active_matmul, "lm_head": 2 * c.lm_head,
             "attention": 4 * context_len * c.attn_width}
    return {**parts, "total": sum(parts.values())}


def expert_share(config) -> tuple[int, int]:
    """(experts run per token, experts) of an MoE config (H3FusionConfig), (1, 1) if dense."""
    n = getattr(config, "num_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    return (int(k), int(n)) if n and k else (1, 1)


def attention_width(config) -> int:
    """Sum over layers of num_attention_heads * head_dim (query width; GQA shares K/V heads but
    every query head still scores every key)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * heads * head_dim


def count_params(model: nn.Module) -> ParamCounts:
    """ParamCounts of a loaded dense or H3Fusion causal LM, from its modules (module docstring)."""
    from pipeline.model.moe import GLUExperts

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    k, n = expert_share(model.config)
    counts = dict(embedding=emb.numel(), lm_head=head.numel(), matmul=0, expert_stored=0,
                  expert_active=0, other=0)
    counts["lm_head_stored"] = 0 if head is emb else head.numel()   # tied: one tensor
    seen = {id(emb), id(head)}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, GLUExperts):
                if p.numel() % n:
                    raise ValueError(f"{type(model).__name__}: expert tensor of {p.numel()} "
                                     f"values does not split into {n} experts")
                counts["expert_stored"] += p.numel()
                counts["expert_active"] += p.numel() // n * k
            elif isinstance(module, nn.Linear) and name == "weight":
                counts["matmul"] += p.numel()
            else:
                counts["other"] += p.numel()
    return ParamCounts(**counts, attn_width=attention_width(model.config))


def ensemble_counts(members: list[ParamCounts], all_members: bool, classifier: int = 0) -> ParamCounts:
    """An ensemble's counts: every member on every token (`all_members`: the members' counts
    summed), else one member per prompt (the member with the most active parameters and FLOPs;
    the others' weights are `idle`) plus the prompt classifier's table."""
    if not members:
        raise ValueError("an ensemble needs members")
    if all_members:
        summed = {f.name: sum(getattr(m, f.name) for m in members) for f in fields(ParamCounts)}
        return ParamCounts(**{**summed, "classifier": summed["classifier"] + classifier})
    run = max(members, key=lambda m: (m.active_non_embedding, m.lm_head, m.attn_width))
    idle = sum(m.stored for m in members) - run.stored
    return ParamCounts(**{**asdict(run), "idle": run.idle + idle,
                          "classifier": run.classifier + classifier})


def is_ensemble(model) -> bool:
    from .scoring import ENSEMBLE_MODEL_TYPE
    return getattr(model.config, "model_type", None) == ENSEMBLE_MODEL_TYPE


def _classifier_size(model) -> int:
    """The router ensemble's prompt-classifier table and bias (buffers `router_*`), else 0."""
    return sum(b.numel() for name, b in model.named_buffers(recurse=False) if name.startswith("router_"))


def model_counts(model: nn.Module) -> ParamCounts:
    """ParamCounts of any model the evaluator loads (ensembles from their members)."""
    if not is_ensemble(model):
        return count_params(model)
    members = [model_counts(m) for m in model.members]
    return ensemble_counts(members, not model.routes_per_prompt, _classifier_size(model))


def describe_runs(model: nn.Module) -> str:
    """What runs per token, in words (the report's `runs` column)."""
    if is_ensemble(model):
        n = len(model.members)
        if not model.routes_per_prompt:
            return f"{model.config.method}: all {n} members per token"
        clf = " + prompt classifier" if _classifier_size(model) else ""
        return f"{model.config.method}: 1 of {n} members per prompt{clf}"
    k, n = expert_share(model.config)
    return f"MoE: top-{k} of {n} experts" if n > 1 else "dense"


def static_cost(model: nn.Module, context_len: int) -> dict[str, Any]:
    """report.json's `cost.<model>` params and FLOPs (no timing)."""
    c = model_counts(model)
    return {"runs": describe_runs(model),
            "params": {"active_non_embedding": c.active_non_embedding,
                       "active_with_embeddings": c.active_with_embeddings,
                       "embedding": c.embedding, "lm_head": c.lm_head, "tied_lm_head": c.tied,
                       "classifier": c.classifier, "stored": c.stored,
                       "expert_stored": c.expert_stored, "expert_active": c.expert_active},
            "flops_per_token": {**flops_per_token(c, context_len), "context_len": context_len}}


# ---- measured throughput --------------------------------------------------------------------

@dataclass
class Clock:
    seconds: float = 0.0
    tokens: int = 0


@dataclass
class CostMeter:
    """One model's static cost (set once it is loaded) and the wall time and tokens of the
    evaluator's scoring and generation calls, summed over tasks."""
    static: Optional[dict] = None
    clocks: dict[str, Clock] = field(default_factory=lambda: {SCORING: Clock(), GENERATION: Clock()})
    device: str = ""
    load_before: Optional[float] = None

    def describe(self, model: nn.Module, context_len: int) -> None:
        self.static = static_cost(model, context_len)
        dev = next(model.parameters()).device
        self.device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
        self.load_before = load_avg_1m()

    def block(self, batch_size: int) -> dict[str, Any]:
        """report.json's `cost.<model>`: static part + measured throughput."""
        out = dict(self.static or {})
        out["throughput"] = throughput(self.clocks, batch_size, self.device,
                                       [self.load_before, load_avg_1m()])
        return out


@contextmanager
def timed(meter: Optional[CostMeter], kind: str) -> Iterator[Clock]:
    """Time the block into `meter`'s `kind` clock (a throw-away clock when meter is None); the
    block adds the tokens it processed to the yielded clock's `tokens`."""
    clock = Clock()
    sync()
    start = time.perf_counter()
    yield clock
    sync()
    if meter is not None:
        meter.clocks[kind].seconds += time.perf_counter() - start
        meter.clocks[kind].tokens += clock.tokens


def rate(tokens: int, seconds: float) -> Optional[float]:
    return round(tokens / seconds, 2) if tokens and seconds > 0 else None


def throughput(clocks: dict[str, Clock], batch_size: int, device: str,
               load: list[Optional[float]]) -> dict[str, Any]:
    s, g = clocks[SCORING], clocks[GENERATION]
    return {"scoring_tokens_per_s": rate(s.tokens, s.seconds), "scored_tokens": s.tokens,
            "scoring_s": round(s.seconds, 3),
            "generation_tokens_per_s": rate(g.tokens, g.seconds), "generated_tokens": g.tokens,
            "generation_s": round(g.seconds, 3), "batch_size": batch_size,
            "threads": torch.get_num_threads(), "device": device, "load_avg_1m": load,
            "measured": "this run"}


def reused_cost(cost: Optional[dict], where: str) -> dict:
    """A cost block taken over with a model's earlier results: its speed says where it was
    measured (a report from before cost blocks has none: a stub that says so)."""
    if not cost:
        return {"throughput": {"measured": f"{where}: no cost recorded there"}}
    out = {**cost, "throughput": dict(cost.get("throughput") or {})}
    out["throughput"]["measured"] = where
    return out


# ---- report.md ------------------------------------------------------------------------------

def si(value: Optional[float]) -> str:
    """134515008 -> '134.5M' (k, M, G, T); None -> '–'."""
    if value is None:
        return "–"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{1 if abs(value) >= 10 * scale else 2}f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _row(name: str, c: dict) -> list[str]:
    p, f, t = c.get("params") or {}, c.get("flops_per_token") or {}, c.get("throughput") or {}
    return [name, c.get("runs", "–"), si(p.get("active_non_embedding")),
            si(p.get("active_with_embeddings")), si(p.get("stored")), si(f.get("total")),
            si(t.get("scoring_tokens_per_s")), si(t.get("generation_tokens_per_s")),
            t.get("measured", "–")]


def cost_lines(report: dict) -> list[str]:
    """report.md's "Cost per model" table (empty when the report has no `cost`)."""
    costs = {m: c for m, c in (report.get("cost") or {}).items() if c}
    if not costs:
        return []
    ctx = sorted({c["flops_per_token"]["context_len"] for c in costs.values() if c.get("flops_per_token")})
    speeds = [c.get("throughput") or {} for c in costs.values()]
    where = sorted({f"{t['device']}, {t['threads']} threads, batch {t['batch_size']}"
                    for t in speeds if t.get("device")})
    loads = [x for t in speeds for x in t.get("load_avg_1m") or [] if x is not None]
    load = f" (1-min load average {min(loads):.1f}–{max(loads):.1f} while timing)" if loads else ""
    lines = ["", "## Cost per model", "",
             "Active params per token: without embeddings (attention, norms, dense MLP or the "
             "MoE's router + top-k experts' FFNs; an `avg` ensemble: every member, a routed one: "
             "one member); + embeddings: with the input table, an untied lm_head and the prompt "
             "classifier. FLOPs/token (forward) = 2 × active matmul params + 2 × H × V (lm_head) "
             f"+ 4 × layers × L × heads·head_dim at L = {', '.join(map(str, ctx)) or '–'} "
             "(the scored sequence cap). tok/s: measured in the evaluation itself — scoring = "
             "scored answer tokens / wall time of the log-likelihood calls, generation = new "
             "tokens kept / wall time of generate() — on "
             f"{'; '.join(where) or 'an unrecorded device'}{load}. The machine may be shared: tok/s "
             "is noisy, comparable within one report only, and is the throughput of the "
             "evaluator's batched path (see docs/evaluation.md).", ""]
    header = ["model", "runs", "active params", "+ embeddings", "stored", "FLOPs/token",
              "scoring tok/s", "generation tok/s", "speed measured in"]
    rows = [_row(m, c) for m, c in costs.items()]
    return lines + ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(str, r)) + " |" for r in rows]

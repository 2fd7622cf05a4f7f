"""Initial router weights of a freshly built MoE: zeros, normal, or prompt hidden states
(registered in `pipeline.registry.ROUTER_INITS`).

`prompts` (the mergekit "hidden" idea, applied where our router actually looks): router row i of
layer l is the mean hidden state at layer l's MLP input (after post_attention_layernorm) over a
few prompts of dimension i, computed by the BASE model. Rows are unit-normalised so that the
logits are cosine-like and one long-norm dimension cannot dominate every token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..io_utils import read_json_object
from ..registry import ROUTER_INITS


def _prompts_from_json(path: Path, names: list[str]) -> dict[str, list[str]]:
    data = read_json_object(path, "expected an object {expert name: [prompt, ...]}")
    return {name: data.get(name) for name in names}


def _prompts_from_run_data(data_dir: Path, names: list[str], limit: int) -> dict[str, list[str]]:
    """Each expert's first `limit` training prompts whose routing label is its dimension (a
    benign request in the harmless set is the helpful expert's: docs/data.md "Routing labels")."""
    from ..data import label_route
    from ..data.loading import data_dimensions, load_sft
    from ..data.template import format_prompt
    out, dims = {}, data_dimensions(data_dir)
    for name in names:
        rows = load_sft(data_dir, name, "train")
        own = [i for i, label in enumerate(rows["task_label"]) if label_route(label, dims) == name]
        rows = rows.select(own[:limit])
        out[name] = [format_prompt(r["instruction"], r["input"]) for r in rows]
    return out


def load_router_prompts(source: str | Path, names: list[str], limit: int) -> dict[str, list[str]]:
    """{expert name: up to `limit` prompts} from a JSON file or a run's data dir."""
    source = Path(source)
    if source.is_dir():
        prompts = _prompts_from_run_data(source, names, limit)
    elif source.is_file():
        prompts = _prompts_from_json(source, names)
    else:
        raise FileNotFoundError(f"router prompts not found: {source}")
    for name in names:
        items = prompts.get(name)
        if not items or not all(isinstance(p, str) and p for p in items):
            raise ValueError(f"{source}: no non-empty prompts for expert {name!r}")
        prompts[name] = items[:limit]
    return prompts


@torch.no_grad()
def prompt_hidden_means(base_dir: Path, tokenizer_dir: Path,
                        prompts: dict[str, list[str]]) -> list[torch.Tensor]:
    """Per layer, [E, H] fp32: mean MLP-input hidden state of each expert's prompts."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0][0].float().mean(dim=0)))
        for layer in model.model.layers]
    per_expert = []
    try:
        for texts in prompts.values():
            sums = None
            for text in texts:
                captured.clear()
                ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
                model(input_ids=ids)
                layer_means = torch.stack(captured)          # [L, H]
                sums = layer_means if sums is None else sums + layer_means
            per_expert.append(sums / len(texts))
    finally:
        for h in hooks:
            h.remove()
    stacked_ELH = torch.stack(per_expert)
    return [stacked_ELH[:, layer] for layer in range(stacked_ELH.shape[1])]


@dataclass
class RouterInitInputs:
    """What a router init may read (each registered init takes what it needs)."""
    base_dir: Path
    tokenizer_dir: Path
    base_cfg: dict                                # the base's config.json
    num_experts: int
    seed: int
    prompts: Optional[dict[str, list[str]]]       # {expert name: prompts}, if `needs_prompts`

    @property
    def layers_hidden(self) -> tuple[int, int]:
        return int(self.base_cfg["num_hidden_layers"]), int(self.base_cfg["hidden_size"])


@dataclass(frozen=True)
class RouterInit:
    """A registered router init: `make(inputs)` -> one fp32 [E, H] per layer; calling it makes
    them. `needs_prompts`: it reads prompts per expert (build_moe's --prompts-data / --prompts;
    the stage graph passes the run's data dir)."""
    make: Callable[[RouterInitInputs], list[torch.Tensor]]
    needs_prompts: bool = False

    def __call__(self, inp: RouterInitInputs) -> list[torch.Tensor]:
        return self.make(inp)


def _zeros(inp: RouterInitInputs) -> list[torch.Tensor]:
    layers, hidden = inp.layers_hidden
    return [torch.zeros(inp.num_experts, hidden) for _ in range(layers)]


def _normal(inp: RouterInitInputs) -> list[torch.Tensor]:
    layers, hidden = inp.layers_hidden
    std = float(inp.base_cfg.get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(inp.seed)
    return [torch.randn(inp.num_experts, hidden, generator=gen) * std for _ in range(layers)]


def _prompts(inp: RouterInitInputs) -> list[torch.Tensor]:
    if not inp.prompts:
        raise ValueError("router init 'prompts' needs prompts for every expert")
    means = prompt_hidden_means(inp.base_dir, inp.tokenizer_dir, inp.prompts)
    return [m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6) for m in means]


zeros_init = RouterInit(_zeros)
normal_init = RouterInit(_normal)
prompts_init = RouterInit(_prompts, needs_prompts=True)


def make_router_weights(init: str, base_dir: Path, tokenizer_dir: Path, base_cfg: dict,
                        num_experts: int, seed: int,
                        prompts: dict[str, list[str]] | None) -> list[torch.Tensor]:
    """One fp32 [E, H] router weight per layer, by the init registered as `init`."""
    make = ROUTER_INITS.get(init, "router init")
    return make(RouterInitInputs(Path(base_dir), Path(tokenizer_dir), base_cfg, num_experts,
                                 seed, prompts))

"""Expert-load profiling of a fused H3Fusion MoE: which expert each task's tokens are routed to.

The model runs over each task's dev items (prompt + response + EOS, padding excluded) and its
`router_outputs` (one `RouterOutput` per layer with `probs_TE` and `topk_idx_TK`, T = B*S
row-major, docs/contracts.md) are accumulated per task x layer x expert into:
top-1 share, top-k share, mean router probability (each sums to 1 over experts), load
imbalance (max/mean and coefficient of variation of the top-k share), router entropy, a
collapse flag (one expert takes more than `collapse_threshold` of the top-1 choices) and
the "own expert" top-1 accuracy (expert i <-> `config.expert_names[i]`).
Outputs: expert_load.csv, layer_stats.csv, expert_load.json, heatmap_<task>.png, TensorBoard.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.config import ProfileConfig
from pipeline.io_utils import atomic_dir, write_json
from pipeline.surgery import plan

ALL = "all"  # pseudo-task: every task's tokens together


@dataclass
class RoutingCounts:
    """Accumulated routing of one task's tokens; arrays are [layers, experts] or [layers]."""
    top1_LE: torch.Tensor
    topk_LE: torch.Tensor
    prob_sum_LE: torch.Tensor
    entropy_sum_L: torch.Tensor
    own_top1_L: torch.Tensor
    num_tokens: int = 0
    top_k: int = 0

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> "RoutingCounts":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(num_layers, num_experts), z(num_layers, num_experts), z(num_layers, num_experts),
                   z(num_layers), z(num_layers))

    def add(self, other: "RoutingCounts") -> None:
        for name in ("top1_LE", "topk_LE", "prob_sum_LE", "entropy_sum_L", "own_top1_L"):
            getattr(self, name).add_(getattr(other, name))
        self.num_tokens += other.num_tokens
        self.top_k = self.top_k or other.top_k


def accumulate_router_outputs(counts: RoutingCounts, router_outputs: Sequence, mask_T: torch.Tensor,
                              own_expert: Optional[int]) -> None:
    """Add one batch's routing (tokens where `mask_T` is true) to `counts`."""
    if len(router_outputs) != counts.top1_LE.shape[0]:
        raise ValueError(f"router_outputs has {len(router_outputs)} layers, expected {counts.top1_LE.shape[0]}")
    num_experts = counts.top1_LE.shape[1]
    for layer, ro in enumerate(router_outputs):
        probs = ro.probs_TE.detach().float().cpu()
        if probs.shape != (mask_T.shape[0], num_experts):
            raise ValueError(f"layer {layer}: probs_TE has shape {tuple(probs.shape)}, expected "
                             f"[T={mask_T.shape[0]}, E={num_experts}] (T = batch * seq)")
        probs = probs[mask_T]
        topk = ro.topk_idx_TK.detach().cpu()[mask_T]
        top1 = probs.argmax(dim=-1)
        counts.top1_LE[layer] += torch.bincount(top1, minlength=num_experts).double()
        counts.topk_LE[layer] += torch.bincount(topk.reshape(-1), minlength=num_experts).double()
        counts.prob_sum_LE[layer] += probs.sum(dim=0).double()
        counts.entropy_sum_L[layer] += float(-(probs * probs.clamp_min(1e-12).log()).sum())
        if own_expert is not None:
            counts.own_top1_L[layer] += float((top1 == own_expert).sum())
        counts.top_k = topk.shape[-1]
    counts.num_tokens += int(mask_T.sum())


def profile_texts(data_dir: Path, task: str, split: str, max_items: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a task: the rows of `sft/<task>/<split>` whose routing label is
    the task (docs/data.md "Routing labels": a benign request in the harmless set is routed to
    helpful, so it is not a harmless row here), else `eval/<task>/<split>` with each item's first
    chosen answer (or its reference) as the response."""
    from pipeline.data import label_route, loading
    from pipeline.data.template import format_prompt

    if (Path(data_dir) / "sft" / task / split).exists():
        ds, dims = loading.load_sft(data_dir, task, split), loading.data_dimensions(data_dir)
        own = [i for i, label in enumerate(ds["task_label"]) if label_route(label, dims) == task]
        ds = ds.select(own)
        rows = ds.select(range(min(max_items, len(ds)))) if max_items > 0 else ds
        return [(format_prompt(r["instruction"], r["input"]), r["response"]) for r in rows]
    ds = loading.load_eval(data_dir, task, split)
    rows = ds.select(range(min(max_items, len(ds)))) if max_items > 0 else ds
    return [(format_prompt(r["instruction"], r["input"]), (r["chosen"] or [r["reference"]])[0])
            for r in rows if r["chosen"] or r["reference"]]


def _encode(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], int]:
    """bos + prompt + response + eos, exactly as in training (`encode_prompt_response`),
    and the position where the response starts."""
    from pipeline.data.template import encode_prompt_response

    prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt, response, max_len)
    return prompt_ids + response_ids, len(prompt_ids)


@torch.no_grad()
def route_task(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_len: int,
               num_layers: int, num_experts: int, own_expert: Optional[int], desc: str,
               response_only: bool = False) -> tuple[RoutingCounts, RoutingCounts]:
    """Run the model over a task's (prompt, response) pairs and accumulate its routing over
    non-padding tokens (only the positions that predict a response token when `response_only`:
    the last prompt position through the one before EOS, `losses.response_span_masks`), and,
    separately, at the position that predicts the first response token."""
    from pipeline.eval.scoring import pad_right, model_device, pad_token_id
    from pipeline.train.fusion.losses import response_span_masks

    counts = RoutingCounts.empty(num_layers, num_experts)
    first_counts = RoutingCounts.empty(num_layers, num_experts)
    encoded = [_encode(tokenizer, p, r, max_len) for p, r in pairs]
    device = model_device(model)
    for lo in tqdm(range(0, len(encoded), batch_size), desc=desc, leave=False):
        chunk = encoded[lo: lo + batch_size]
        ids, mask = pad_right([seq for seq, _ in chunk], pad_token_id(tokenizer))
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        span, first = response_span_masks(torch.tensor([start for _, start in chunk]),
                                          mask.sum(dim=1), mask.shape[1])
        if response_only:
            mask = mask * span
        router_outputs = getattr(out, "router_outputs", None)
        if router_outputs is None:
            raise ValueError("model output has no router_outputs: not a fused H3Fusion MoE model")
        accumulate_router_outputs(counts, router_outputs, mask.reshape(-1).bool(), own_expert)
        accumulate_router_outputs(first_counts, router_outputs, first.reshape(-1), own_expert)
    return counts, first_counts


@dataclass
class LayerStats:
    top1_share: list[float]
    topk_share: list[float]
    mean_prob: list[float]
    imbalance_max_mean: float
    load_cv: float
    entropy: float
    entropy_norm: float
    collapsed: bool
    own_top1_acc: Optional[float] = None


def layer_stats(counts: RoutingCounts, layer: int, threshold: float, has_own: bool) -> LayerStats:
    n, num_experts = max(counts.num_tokens, 1), counts.top1_LE.shape[1]
    top1 = counts.top1_LE[layer] / n
    topk = counts.topk_LE[layer] / (n * max(counts.top_k, 1))
    mean_load = topk.mean()  # = 1/E: imbalance is measured on the top-k (dispatched) load
    entropy = float(counts.entropy_sum_L[layer]) / n
    return LayerStats(
        top1_share=top1.tolist(), topk_share=topk.tolist(),
        mean_prob=(counts.prob_sum_LE[layer] / n).tolist(),
        imbalance_max_mean=float(topk.max() / mean_load),
        load_cv=float(topk.std(unbiased=False) / mean_load),
        entropy=entropy, entropy_norm=entropy / math.log(num_experts) if num_experts > 1 else 0.0,
        collapsed=bool(top1.max() > threshold),
        own_top1_acc=float(counts.own_top1_L[layer]) / n if has_own else None)


def summarize(per_task: dict[str, RoutingCounts], expert_names: Sequence[str], threshold: float) -> dict:
    """JSON-able summary: per task, per-layer stats and means over layers."""
    tasks = {}
    for task, counts in per_task.items():
        own = task in expert_names
        layers = [layer_stats(counts, layer, threshold, own) for layer in range(counts.top1_LE.shape[0])]
        mean_over = lambda attr: sum(getattr(s, attr) for s in layers) / len(layers)  # noqa: E731
        tasks[task] = {
            "num_tokens": counts.num_tokens,
            "own_expert": expert_names.index(task) if own else None,
            "own_top1_acc": mean_over("own_top1_acc") if own else None,
            "top1_share": (counts.top1_LE.sum(0) / (counts.top1_LE.sum() or 1)).tolist(),
            "mean_imbalance_max_mean": mean_over("imbalance_max_mean"),
            "mean_load_cv": mean_over("load_cv"), "mean_entropy": mean_over("entropy"),
            "collapsed_layers": [i for i, s in enumerate(layers) if s.collapsed],
            "layers": [vars(s) for s in layers]}
    return {"expert_names": list(expert_names), "collapse_threshold": threshold,
            "top_k": next(iter(per_task.values())).top_k if per_task else None,
            "any_collapse": any(t["collapsed_layers"] for t in tasks.values()), "tasks": tasks}


def format_summary(summary: dict) -> str:
    """One line per task: tokens, own-expert top-1 accuracy, top-1 shares, collapsed layers."""
    lines = []
    for task, t in summary["tasks"].items():
        own = "–" if t["own_top1_acc"] is None else f"{t['own_top1_acc']:.3f}"
        shares = ", ".join(f"{n}={v:.3f}" for n, v in zip(summary["expert_names"], t["top1_share"]))
        lines.append(f"{task:<9} tokens={t['num_tokens']:<7} own-expert top-1 acc={own:<6} "
                     f"top-1 share: {shares}"
                     + (f"  COLLAPSED layers {t['collapsed_layers']}"
                        if t["collapsed_layers"] and task != ALL else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- outputs

def write_csvs(summary: dict, out_dir: Path) -> None:
    """expert_load.csv (task, layer, expert rows) and layer_stats.csv (task, layer rows)."""
    names = summary["expert_names"]
    with open(out_dir / "expert_load.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "layer", "expert", "expert_name", "top1_share", "topk_share", "mean_prob"])
        for task, t in summary["tasks"].items():
            for layer, s in enumerate(t["layers"]):
                for e, name in enumerate(names):
                    w.writerow([task, layer, e, name, s["top1_share"][e], s["topk_share"][e], s["mean_prob"][e]])
    cols = ["imbalance_max_mean", "load_cv", "entropy", "entropy_norm", "collapsed", "own_top1_acc"]
    with open(out_dir / "layer_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "layer", "num_tokens"] + cols)
        for task, t in summary["tasks"].items():
            for layer, s in enumerate(t["layers"]):
                w.writerow([task, layer, t["num_tokens"]] + ["" if s[c] is None else s[c] for c in cols])


def heatmap_figure(task: str, task_summary: dict, expert_names: Sequence[str]):
    """Figure with two layers x experts heatmaps: top-1 share and top-k share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = task_summary["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(expert_names), 2 + 0.45 * len(layers)),
                             layout="constrained")
    for ax, key in zip(axes, ("top1_share", "topk_share")):
        grid = [s[key] for s in layers]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(expert_names)), expert_names, rotation=30)
        ax.set_yticks(range(len(layers)))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(key.replace("_", " "))
    fig.colorbar(im, ax=list(axes), shrink=0.9)
    fig.suptitle(f"routing of {task} tokens ({task_summary['num_tokens']} tokens)")
    return fig


def write_plots_and_tensorboard(summary: dict, out_dir: Path, tb_dir: Path) -> None:
    """heatmap_<task>.png per task; per-layer curves and heatmaps to TensorBoard (step = layer)."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    names = summary["expert_names"]
    for task, t in summary["tasks"].items():
        fig = heatmap_figure(task, t, names)
        fig.savefig(out_dir / f"heatmap_{task}.png", dpi=110, bbox_inches="tight")
        for layer, s in enumerate(t["layers"]):
            for e, name in enumerate(names):
                writer.add_scalar(f"profile/{task}/top1_share/{name}", s["top1_share"][e], layer)
            for key in ("imbalance_max_mean", "load_cv", "entropy", "own_top1_acc"):
                if s[key] is not None:
                    writer.add_scalar(f"profile/{task}/{key}", s[key], layer)
        writer.add_figure(f"profile/heatmap/{task}", fig, close=True)
        plt.close(fig)
    writer.close()


def profile_model(model, tokenizer, pairs_by_task: dict[str, list[tuple[str, str]]], out_dir: Path,
                  cfg: ProfileConfig, tb_dir: Optional[Path] = None, overwrite: bool = False) -> dict:
    """Route every task's (prompt, response) pairs through `model`; write all outputs to
    `out_dir` atomically; return the summary dict (also expert_load.json).

    TensorBoard events go to `tb_dir`, by default `out_dir/tensorboard`."""
    num_layers, num_experts = model.config.num_hidden_layers, model.config.num_experts
    expert_names = plan.expert_names({"num_experts": num_experts,
                                      "expert_names": getattr(model.config, "expert_names", None)},
                                     "model config")
    max_len = min(cfg.max_seq_len, getattr(model.config, "max_position_embeddings", cfg.max_seq_len))
    per_task: dict[str, RoutingCounts] = {}
    first_token: dict[str, RoutingCounts] = {}
    total = RoutingCounts.empty(num_layers, num_experts)
    for task, pairs in pairs_by_task.items():
        if not pairs:
            raise ValueError(f"profile: no items for task {task!r}")
        own = expert_names.index(task) if task in expert_names else None
        per_task[task], first_token[task] = route_task(
            model, tokenizer, pairs, cfg.batch_size, max_len, num_layers, num_experts, own,
            desc=f"route {task}", response_only=cfg.tokens == "response")
        total.add(per_task[task])
    per_task[ALL] = total
    summary = summarize(per_task, expert_names, cfg.collapse_threshold)
    summary["tokens"] = cfg.tokens
    # the position whose routing picks the first response token, reported on its own
    first = summarize(first_token, expert_names, cfg.collapse_threshold)["tasks"]
    for task, t in first.items():
        summary["tasks"][task]["first_response_token"] = {
            k: t[k] for k in ("num_tokens", "own_top1_acc", "top1_share")}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_json(tmp / "expert_load.json", summary)
        write_csvs(summary, tmp)
        # default: events inside the output dir (written in the temp dir, so they survive the rename)
        write_plots_and_tensorboard(summary, tmp, tb_dir or tmp / "tensorboard")
        write_json(tmp / "manifest.json", {"stage": "profile", "tasks": list(pairs_by_task),
                                           "num_layers": num_layers, "num_experts": num_experts})
    return summary


def profile_model_dir(model_dir: Path, data_dir: Path, out_dir: Path, cfg: ProfileConfig,
                      tokenizer_dir: Optional[Path] = None, tb_dir: Optional[Path] = None,
                      overwrite: bool = False) -> dict:
    """Load the fused model from `model_dir` and profile it on `data_dir`'s per-task items."""
    from pipeline.data.loading import data_dimensions
    from pipeline.eval.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir, tokenizer_dir)
    if not hasattr(model.config, "num_experts"):
        raise ValueError(f"{model_dir}: config has no num_experts: not a fused H3Fusion MoE model")
    pairs = {task: profile_texts(data_dir, task, cfg.split, cfg.max_items_per_task)
             for task in data_dimensions(data_dir)}
    return profile_model(model, tokenizer, pairs, out_dir, cfg, tb_dir, overwrite)

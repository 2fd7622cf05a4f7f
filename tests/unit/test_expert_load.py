"""Expert-load profiling: hand-computed shares from a stand-in router, then the real fused model
through `h3fusion profile` and tools/profiling/expert_load.py."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ProfileConfig
from pipeline.data.template import encode_prompt_response, format_prompt
from pipeline.model import RouterOutput
from pipeline.profiling.stage import ALL, profile_model
from test_eval_fixtures import build_data_dir, char_tokenizer, save_tiny_fused

EVEN, ODD, PAD_ROUTE = [0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.0, 0.0, 1.0]


class StandInMoE(torch.nn.Module):
    """Routes by token id with fixed probabilities and returns `router_outputs` as the contract
    says: layer 0 sends 98% of every token's mass to expert 0 (collapse); layer 1 uses EVEN or
    ODD by the id's parity; the pad id 0 goes to expert 2, so counting padding would show."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, num_experts=3, max_position_embeddings=512,
                                      expert_names=["helpful", "harmless", "honest"])
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        ids = torch.arange(vocab)
        layer1 = torch.where((ids % 2 == 0)[:, None], torch.tensor(EVEN), torch.tensor(ODD))
        layer1[0] = torch.tensor(PAD_ROUTE)
        layer0 = torch.tensor([0.98, 0.01, 0.01]).repeat(vocab, 1)
        layer0[0] = torch.tensor(PAD_ROUTE)
        self.tables = [layer0, layer1]

    def forward(self, input_ids, attention_mask=None):
        outs = []
        for table in self.tables:
            probs = table[input_ids.reshape(-1)]
            weight, idx = torch.topk(probs, 2, dim=-1)
            outs.append(RouterOutput(probs.log(), probs, idx, weight / weight.sum(-1, keepdim=True),
                                     torch.bincount(idx.reshape(-1), minlength=3)))
        return SimpleNamespace(logits=None, router_outputs=tuple(outs))


PAIRS = {"helpful": [(format_prompt("What is 2+3?"), "The answer is 5."),
                     (format_prompt("Sort", "c b a"), "The answer is a b c.")],
         "harmless": [(format_prompt("How do I steal a car?"), "I can't help with that.")],
         "honest": [(format_prompt("Are bats blind?"), "No."), (format_prompt("Q"), "Yes, a long one.")]}


def _even_fraction(tok, pairs) -> tuple[float, int]:
    ids = [i for p, r in pairs for i in sum(encode_prompt_response(tok, p, r, 512), [])]
    return sum(1 for i in ids if i % 2 == 0) / len(ids), len(ids)


def test_shares_entropy_collapse_and_own_expert_match_hand_computation(tmp_path):
    tok = char_tokenizer()
    cfg = ProfileConfig(batch_size=2, max_seq_len=512, collapse_threshold=0.95, tokens="all")
    summary = profile_model(StandInMoE(len(tok)), tok, PAIRS, tmp_path / "prof", cfg)
    h_row = -sum(p * math.log(p) for p in EVEN)
    for i, task in enumerate(PAIRS):
        fe, n = _even_fraction(tok, PAIRS[task])
        t = summary["tasks"][task]
        assert t["num_tokens"] == n                            # padding excluded
        l0, l1 = t["layers"]
        assert l0["top1_share"] == pytest.approx([1.0, 0.0, 0.0]) and l0["collapsed"]
        assert l1["top1_share"] == pytest.approx([fe, 0.0, 1 - fe])
        assert l1["topk_share"] == pytest.approx([fe / 2, 0.5, (1 - fe) / 2])
        assert l1["mean_prob"] == pytest.approx([0.6 * fe + 0.1 * (1 - fe), 0.3, 0.1 * fe + 0.6 * (1 - fe)])
        assert l1["entropy"] == pytest.approx(h_row) and l1["entropy_norm"] == pytest.approx(h_row / math.log(3))
        share = l1["topk_share"]
        assert l1["imbalance_max_mean"] == pytest.approx(max(share) * 3)
        assert l1["load_cv"] == pytest.approx(float(torch.tensor(share).std(unbiased=False)) * 3)
        own_l1 = [fe, 0.0, 1 - fe][i]
        assert t["own_expert"] == i and t["own_top1_acc"] == pytest.approx(([1.0, 0, 0][i] + own_l1) / 2)
        assert t["collapsed_layers"] == [0]
    assert summary["any_collapse"] and summary["tasks"][ALL]["own_top1_acc"] is None
    assert summary["tasks"][ALL]["num_tokens"] == sum(summary["tasks"][t]["num_tokens"] for t in PAIRS)


def test_response_only_profile_counts_the_positions_that_predict_the_response(tmp_path):
    # logits at t predict token t+1: the counted positions are the last prompt token through the
    # token before EOS (the stand-in routes by the id at the position), and the last prompt token
    # alone is the first-response-token position
    tok = char_tokenizer()
    cfg = ProfileConfig(batch_size=2, max_seq_len=512, tokens="response")
    summary = profile_model(StandInMoE(len(tok)), tok, PAIRS, tmp_path / "prof", cfg)
    assert summary["tokens"] == "response"
    for task, pairs in PAIRS.items():
        encoded = [encode_prompt_response(tok, p, r, 512) for p, r in pairs]
        routed = [i for prompt, resp in encoded for i in prompt[-1:] + resp[:-1]]
        t = summary["tasks"][task]
        assert t["num_tokens"] == len(routed)
        even = sum(1 for i in routed if i % 2 == 0) / len(routed)
        assert t["layers"][1]["top1_share"] == pytest.approx([even, 0.0, 1 - even])
        firsts = [prompt[-1] for prompt, _ in encoded]
        first = t["first_response_token"]
        assert first["num_tokens"] == len(pairs)
        even_first = sum(1 for i in firsts if i % 2 == 0) / len(firsts)
        # top1_share is summed over both layers: layer 0 sends everything to expert 0
        assert first["top1_share"] == pytest.approx([(1 + even_first) / 2, 0.0, (1 - even_first) / 2])


def _check_outputs(out: Path, tasks: list[str], layers: int, experts: int) -> dict:
    summary = json.loads((out / "expert_load.json").read_text())
    with open(out / "expert_load.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tasks) * layers * experts
    for task in tasks:
        for layer in range(layers):
            cell = [r for r in rows if r["task"] == task and int(r["layer"]) == layer]
            for key in ("top1_share", "topk_share", "mean_prob"):
                assert sum(float(r[key]) for r in cell) == pytest.approx(1.0, abs=1e-6)
        assert (out / f"heatmap_{task}.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "layer_stats.csv") as f:
        assert len(list(csv.DictReader(f))) == len(tasks) * layers
    assert (out / "manifest.json").is_file()
    return summary


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("profrun")
    build_data_dir(run, per_split=4)
    save_tiny_fused(run / "fused", seed=1)
    return run


def test_profile_cli_on_real_fused_model(fused_run, capsys):
    from pipeline.commands import main
    assert main(["profile", "--run-dir", str(fused_run), "--set", "batch_size=3", "--set", "tokens=all"]) == 0
    tasks = ["helpful", "harmless", "honest", ALL]
    summary = _check_outputs(fused_run / "profile", tasks, layers=2, experts=3)
    assert summary["expert_names"] == ["helpful", "harmless", "honest"] and summary["top_k"] == 2
    for task in tasks[:3]:
        assert 0.0 <= summary["tasks"][task]["own_top1_acc"] <= 1.0
        assert summary["tasks"][task]["num_tokens"] > 4 * 50   # 4 dev rows of >50 char tokens
    assert list((fused_run / "tensorboard" / "profile").glob("events.out.tfevents.*"))
    assert "own-expert top-1 acc" in capsys.readouterr().out
    # a finished output is never silently replaced
    assert main(["profile", "--run-dir", str(fused_run)]) == 2


def test_expert_load_tool_runs_directly(fused_run, tmp_path):
    tool = Path(__file__).resolve().parents[2] / "tools" / "profiling" / "expert_load.py"
    help_out = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "--model" in help_out.stdout and "--out" in help_out.stdout
    sys.path.insert(0, str(tool.parent))
    try:
        import expert_load
    finally:
        sys.path.remove(str(tool.parent))
    out = tmp_path / "prof"
    assert expert_load.main(["--model", str(fused_run / "fused"), "--data", str(fused_run / "data"),
                             "--out", str(out), "--max-items", "2", "--batch-size", "2"]) == 0
    _check_outputs(out, ["helpful", "harmless", "honest", ALL], layers=2, experts=3)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_profiling_rejects_a_dense_model(fused_run, tmp_path):
    from pipeline.profiling.stage import profile_model_dir
    from test_eval_fixtures import save_tiny_llama
    dense = save_tiny_llama(tmp_path / "dense", seed=0)
    with pytest.raises(ValueError, match="not a fused H3Fusion MoE"):
        profile_model_dir(dense, fused_run / "data", tmp_path / "out", ProfileConfig())

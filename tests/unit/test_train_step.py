"""tools/profiling/train_step.py: a real run of both stages on a very small batch reports every
phase, FLOPs and the dense-matmul peak (per precision: fp32, and bf16 where the CPU has it), all
positive; the FLOP count is checked by hand; bf16 on a CPU without it is refused up front."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "profiling" / "train_step.py"
PHASES = ("data_s", "forward_s", "backward_s", "optimizer_s", "step_s", "achieved_flop_per_s",
          "fraction_of_dense_peak")


def test_step_flops_by_hand():
    tool = load_tool("profiling/train_step.py")
    shape = dict(hidden_size=2, intermediate_size=3, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, vocab_size=5)
    # 2 FLOPs per weight: attn 2*(4+4)=16 weights -> 32, ffn 3*2*3=18 -> 36, head 10 -> 20, so 88;
    # scores 2*2*seq*h = 8: forward 96, input grads 88 + 2*8 = 104, ffn weight grads 36
    assert tool.step_flops(shape, tokens=1, seq=1, trainable="none") == 96 + 104
    assert tool.step_flops(shape, tokens=1, seq=1, trainable="ffn") == 96 + 104 + 36
    assert tool.step_flops(shape, 3, 1, "ffn", experts_per_token=2) == 3 * (132 + 140 + 72)


def test_both_stages_report_positive_phases_flops_and_peak(tmp_path):
    out = tmp_path / "train_step.json"
    # a subprocess: the tool joins a (1-rank) process group, which must not leak into pytest;
    # bf16 too where the CPU has it (elsewhere the tool refuses it: tested below)
    from pipeline.precision import cpu_bf16_support
    wanted = ["fp32", "bf16"] if cpu_bf16_support() else ["fp32"]
    done = subprocess.run([sys.executable, str(TOOL), "--preset", "tiny", "--micro-batch", "2",
                           "--seq-len", "16", "--steps", "2", "--warmup", "0", "--threads", "1",
                           "--precision", *wanted, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "model FLOPs/step" in done.stdout and "dense matmul peak" in done.stdout
    report = json.loads(out.read_text())
    precisions = list(report["precisions"])
    assert precisions == wanted
    assert [s["stage"] for s in report["stages"]] == ["expert", "fusion"]
    for stage in report["stages"]:
        assert stage["tokens_per_step"] == 2 * 16
        assert stage["model_flops_per_step"] > 0
        assert sorted(stage["dense_peak_flop_per_s"]) == sorted(precisions)
        assert all(v > 0 for v in stage["dense_peak_flop_per_s"].values())
        assert all(math.isfinite(v) for v in stage["deepspeed_overhead_s"].values())
        for engine in ("deepspeed", "plain"):
            for prec in precisions:
                row = stage[engine][prec]
                assert all(row[k] > 0 and math.isfinite(row[k]) for k in PHASES), (engine, row)
                assert row["collectives_s"] >= 0
                assert math.isclose(row["step_s"], sum(row[k] for k in PHASES[:4]), rel_tol=0.5)


def test_bf16_on_a_cpu_without_it_is_one_error_before_any_model(monkeypatch, capsys):
    from pipeline import precision
    tool = load_tool("profiling/train_step.py")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)
    monkeypatch.setattr(tool.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tool, "_init_single_process", lambda: pytest.fail("went on"))
    assert tool.main(["--preset", "tiny", "--precision", "fp32", "bf16"]) == 2
    assert "--precision: bf16 was asked for, but this CPU has no bf16" in capsys.readouterr().err

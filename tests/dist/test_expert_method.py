"""tools/profiling/expert_method.py: FFN and LoRA experts trained for real (2-process ZeRO-3 via
`h3fusion run --only expert_<task>`), timed, scored against the base on their own task."""
import json
import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/conftest helpers
from conftest import TINY_RUN_OVERRIDES, load_tool  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _run_dir_with_config(tiny_run, root: Path) -> Path:
    """A run dir linking the shared fixture's finished stages, with its resolved config."""
    from pipeline.config import dump_yaml, load_config
    root.mkdir()
    for name in ("data", "tokenizer", "base"):
        (root / name).symlink_to(getattr(tiny_run, name), target_is_directory=True)
    cfg = load_config("tiny", TINY_RUN_OVERRIDES + [
        "expert.train.max_steps=2", "expert.train.micro_batch_size=2", "expert.train.max_seq_len=48",
        "expert.train.lr=1e-2", "eval.max_items_per_task=4", "eval.batch_size=4"])
    (root / "resolved_config.yaml").write_text(dump_yaml(cfg))
    return root


def test_ffn_and_lora_experts_are_trained_timed_and_scored(tiny_run, tmp_path):
    run_dir = _run_dir_with_config(tiny_run, tmp_path / "run")
    out = tmp_path / "cmp"
    tool = load_tool("profiling/expert_method.py")
    assert tool.main(["--run-dir", str(run_dir), "--tasks", "honest", "--out", str(out),
                      "--lora-set", "expert.lora.r=4"]) == 0
    result = json.loads((out / "expert_method.json").read_text())
    honest = result["tasks"]["honest"]
    # built-in honest items are pairs (pipeline.dimensions): its first available score is pref_acc
    assert honest["base"]["metric"] == "pref_acc" and honest["base"]["n_items"] == 4
    base_weights = load_file(str(tiny_run.base / "model.safetensors"))
    for method in ("ffn", "lora"):
        r = honest["methods"][method]
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and math.isfinite(r["score"])
        assert r["gain"] == pytest.approx(r["score"] - honest["base"]["score"])
        assert f"expert.method={method}" in r["overrides"]
        weights = load_file(str(out / r["dir"] / "model.safetensors"))
        changed = [k for k in weights if not weights[k].equal(base_weights[k])]
        # both methods change the FFN (LoRA is merged into it) and nothing else
        assert changed and all(".mlp." in k for k in changed), (method, changed[:4])
    assert "expert.lora.r=4" in honest["methods"]["lora"]["overrides"]
    table = (out / "expert_method.md").read_text()
    assert "| honest | ffn | pref_acc |" in table and "| honest | lora | pref_acc |" in table

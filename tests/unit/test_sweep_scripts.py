"""tools/sweep/*.sh refuse a run that is not finished, naming what is missing, before any stage
runs (the scripts' work itself is covered by the e2e test of fusion_seed.sh and by the runs in
docs/tuning.md)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, env_h3: str = "false") -> subprocess.CompletedProcess:
    # H3FUSION=false: if the script got past its checks, the first stage would "fail" with rc 1
    return subprocess.run(["bash", str(REPO / "tools/sweep" / name), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "H3FUSION": env_h3})


def fake_run(root: Path, parts: list[str]) -> Path:
    for part in parts:
        (root / part).mkdir(parents=True, exist_ok=True)
    (root / "resolved_config.yaml").write_text("{}\n")
    return root


def test_ablations_usage_error_without_two_arguments(tmp_path):
    proc = run_script("smollm2_ablations.sh", str(tmp_path))
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.parametrize("missing", ["fused_init", "ensembles/avg", "experts"])
def test_ablations_name_the_missing_part_and_write_nothing(tmp_path, missing):
    parts = [p for p in ["data", "tokenizer", "base", "experts", "fused_init", "fused", "ensembles/avg"]
             if p != missing]
    run = fake_run(tmp_path / "run", parts)
    proc = run_script("smollm2_ablations.sh", str(run), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{run}/{missing} is missing" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ablations_start_the_first_stage_once_the_run_is_complete(tmp_path):
    run = fake_run(tmp_path / "run", ["data", "tokenizer", "base", "experts", "fused_init", "fused",
                                      "ensembles/avg"])
    proc = run_script("smollm2_ablations.sh", str(run), str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr       # `false` as h3fusion: the first stage ran
    assert (tmp_path / "out/top1/experts").is_dir()  # its inputs were shared first

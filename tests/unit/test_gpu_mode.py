"""GPU mode never degrades silently (issue 31, part 6).

slurm/lib.sh exports H3F_DEVICE=cuda in GPU mode; pipeline.env then refuses to run when torch
cannot use CUDA, naming which of the three usual causes it is. A config that needs CUDA
(fusion.moe_backend=megablocks, as the llama2-7b preset) is refused before any work on a machine
without it. torch.cuda is faked with monkeypatch, so every case runs on this CPU-only torch.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import env
from pipeline.commands import main as h3fusion
from pipeline.config import load_config
from pipeline.env import CudaUnavailableError, accelerator_kind, require_cuda
from pipeline.stages import cuda_needs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # accelerator_kind() setdefaults DS_ACCELERATOR: pinned here so nothing leaks out
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name in ("H3F_DEVICE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def fake_cuda(monkeypatch, *, built_for, available=False, count=0, init_error=None):
    """torch as a CUDA (`built_for`="12.4") or CPU-only (None) build that sees `count` GPUs."""
    monkeypatch.setattr(torch.version, "cuda", built_for)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def init():
        if init_error:
            raise RuntimeError(init_error)
    monkeypatch.setattr(torch.cuda, "init", init)


def test_gpu_mode_with_cpu_only_torch_names_the_build(monkeypatch):
    fake_cuda(monkeypatch, built_for=None)
    monkeypatch.setenv("H3F_DEVICE", "cuda")
    with pytest.raises(CudaUnavailableError) as err:
        accelerator_kind()
    msg = str(err.value)
    assert msg.startswith("H3F_DEVICE=cuda (GPU mode, set by slurm/lib.sh) needs CUDA")
    assert f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)" in msg


@pytest.mark.parametrize("visible, init_error", [("", None), ("7", "No CUDA GPUs are available")])
def test_gpu_mode_with_hidden_gpus_names_cuda_visible_devices(monkeypatch, visible, init_error):
    fake_cuda(monkeypatch, built_for="12.4", init_error=init_error)
    monkeypatch.setenv("H3F_DEVICE", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(CudaUnavailableError, match=f"CUDA_VISIBLE_DEVICES='{visible}' hides "
                                                   "every GPU from this process"):
        accelerator_kind()


def test_gpu_mode_with_missing_driver_names_the_driver(monkeypatch):
    fake_cuda(monkeypatch, built_for="12.4", init_error="Found no NVIDIA driver on your system.")
    monkeypatch.setenv("H3F_DEVICE", "cuda")
    with pytest.raises(CudaUnavailableError) as err:
        accelerator_kind()
    msg = str(err.value)
    assert "is built for CUDA 12.4, but no GPU is usable (Found no NVIDIA driver" in msg
    assert "the NVIDIA driver is missing or older than CUDA 12.4 needs" in msg


def test_too_few_gpus_for_the_processes(monkeypatch):
    fake_cuda(monkeypatch, built_for="12.4", available=True, count=2)
    require_cuda("x", min_devices=2)
    with pytest.raises(CudaUnavailableError, match=r"x needs 8 GPUs \(one per process\), but torch sees 2 "):
        require_cuda("x", min_devices=8)


def test_device_pinning(monkeypatch):
    fake_cuda(monkeypatch, built_for="12.4", available=True, count=1)
    assert accelerator_kind() == "cuda"                  # unset: what torch sees ...
    assert env.os.environ["DS_ACCELERATOR"] == "cpu"     # ... and a set DS_ACCELERATOR stays
    monkeypatch.setenv("H3F_DEVICE", "cuda")             # GPU mode: DeepSpeed must not stay on CPU
    assert accelerator_kind() == "cuda" and env.os.environ["DS_ACCELERATOR"] == "cuda"
    monkeypatch.setenv("H3F_DEVICE", "cpu")
    assert accelerator_kind() == "cpu"                   # lib.sh's CPU mode wins over a GPU
    assert env.dist_backend() == "gloo" and env.os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("H3F_DEVICE", "gpu")
    with pytest.raises(ValueError, match="H3F_DEVICE='gpu': expected cuda, cpu or auto"):
        accelerator_kind()


def test_command_stops_before_work_in_gpu_mode_without_cuda(monkeypatch, tmp_path, capsys):
    fake_cuda(monkeypatch, built_for=None)
    monkeypatch.setenv("H3F_DEVICE", "cuda")
    assert h3fusion(["data", "--run-dir", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("h3fusion data: error: H3F_DEVICE=cuda"), lines
    assert "CPU-only build" in lines[0]
    assert not (tmp_path / "run").exists()


def test_cuda_needs_of_the_presets():
    assert cuda_needs(load_config("tiny")) == []
    gpu = load_config("llama2-7b")
    assert cuda_needs(gpu) == ["fusion.moe_backend=megablocks (stage fuse; use "
                               "fusion.moe_backend=torch on CPU)"]
    assert cuda_needs(gpu, {"data", "tokenizer", "base", "expert_helpful"}) == []


def test_run_with_megablocks_on_a_machine_without_cuda_fails_before_any_stage(
        monkeypatch, tmp_path, capsys):
    fake_cuda(monkeypatch, built_for=None)
    run = tmp_path / "run"
    assert h3fusion(["run", "--run-dir", str(run), "--set", "fusion.moe_backend=megablocks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("h3fusion run: error: tiny: fusion.moe_backend="
                                               "megablocks (stage fuse; "), err
    assert "needs CUDA, but torch cannot use it: torch" in err[0]
    assert not list(run.glob("*"))                       # no resolved config, no stage output


def test_fuse_with_megablocks_on_a_machine_without_cuda_fails_first(monkeypatch, tmp_path):
    from pipeline.layout import RunLayout
    from pipeline.train.fusion.stage import FusionPaths, train_fusion

    fake_cuda(monkeypatch, built_for=None)
    cfg = load_config("tiny", ["fusion.moe_backend=megablocks"])
    paths = FusionPaths.for_run(RunLayout.at(tmp_path / "run"), None, None)
    # the CUDA check comes before anything is read (there is no fused_init here at all)
    with pytest.raises(CudaUnavailableError, match="megablocks"):
        train_fusion(cfg, paths)
    assert not (tmp_path / "run").exists()


def _stage_info():
    spec = importlib.util.spec_from_file_location("h3f_stage_info", REPO / "slurm/stage_info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_resolve_checks_the_device_mode_before_writing(monkeypatch, tmp_path):
    """lib.sh's `stage_info.py resolve --device=MODE:NPROC`: GPU mode needs NPROC usable GPUs,
    CPU mode a config that needs no CUDA; on failure the resolved config is not written."""
    stage_info = _stage_info()
    out = tmp_path / "resolved.yaml"
    with pytest.raises(ValueError, match="llama2-7b: fusion.moe_backend=megablocks .* runs only "
                                         r"on CUDA GPUs, but this runs in CPU mode \(H3F_GPUS"):
        stage_info.main(["resolve", "llama2-7b", str(out), "--device=cpu:1"])
    fake_cuda(monkeypatch, built_for="12.4", available=True, count=4)
    with pytest.raises(CudaUnavailableError, match=r"GPU mode .* needs 8 GPUs \(one per process\), but torch sees 4"):
        stage_info.main(["resolve", "tiny", str(out), "--device=cuda:8"])
    assert not out.exists()
    assert stage_info.main(["resolve", "tiny", str(out), "--device=cuda:4"]) == 0
    assert load_config(str(out)).name == "tiny"


def test_pipeline_sh_refuses_a_cuda_config_for_a_cpu_cluster(tmp_path):
    """slurm/pipeline.sh with H3F_GPUS_PER_NODE=0 and a megablocks config: refused before any
    sbatch (--dry-run would print them). The same check runs in every CPU-mode job (h3f_init)."""
    env = {**os.environ, "H3F_RUN_DIR": str(tmp_path / "run"), "H3F_GPUS_PER_NODE": "0",
           "H3F_MOE_BACKEND": "megablocks"}
    venv = Path(sys.executable).parents[1]
    if (venv / "bin" / "activate").is_file():       # lib.sh activates it: this test's python
        env["H3F_VENV"] = str(venv)
    proc = subprocess.run(["bash", str(REPO / "slurm/pipeline.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and not proc.stdout, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny: fusion.moe_backend=megablocks (stage fuse; use fusion." \
        "moe_backend=torch on CPU) runs only on CUDA GPUs, but this runs in CPU mode" in lines[0]
    assert not (tmp_path / "run" / "resolved_config.yaml").exists()

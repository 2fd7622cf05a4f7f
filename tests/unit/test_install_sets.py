"""The pinned GPU dependency sets and what each torch of them lacks, without network:

- requirements-gpu-{torch,megablocks}.txt (tools/install/resolve.sh) pin every package with `==`,
  the megablocks set holds MegaBlocks 0.10.0's own pins and satisfies the requirements
  tools/install/uv.toml declares for its sdist-only packages, both keep requirements-cpu.txt's
  versions wherever the set does not have to differ, and setup.py's torch floor and extras are
  these pins;
- a torch older than the sets allow is one error before any command runs;
- the MegaBlocks check imports the compiled ops (fake modules in sys.modules stand in for a
  build with and without them);
- the torch backend says which expert implementation `impl="auto"` takes, and warns once when
  a CUDA bf16 input falls back to the loop because torch lacks `_grouped_mm` (torch 2.7).
"""
from __future__ import annotations

import importlib.machinery
import logging
import runpy
import sys
import tomllib
import types
from pathlib import Path

import pytest
import setuptools
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline import backends
from pipeline.backends import BackendUnavailableError, megablocks_missing, torch_too_old
from pipeline.model import routing

REPO = Path(__file__).resolve().parents[2]
SETS = ("torch", "megablocks")
# what megablocks 0.10.0 bounds itself, so the megablocks set cannot keep the CPU versions
MEGABLOCKS_OWN = {"torch", "numpy", "packaging"}


def pins(name: str) -> dict[str, str]:
    """{canonical name: version} of a pinned file; each requirement line must be `name==version`."""
    out = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==" and not req.marker and not req.url, \
            f"{name}: {line!r} is not an exact pin"
        assert canonicalize_name(req.name) not in out, f"{name}: {req.name} pinned twice"
        out[canonicalize_name(req.name)] = spec[0].version
    return out


def setup_kwargs() -> dict:
    got = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: got.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = real
    return got


def test_megablocks_set_pins_megablocks_and_the_torch_it_needs():
    mb = pins("requirements-gpu-megablocks.txt")
    assert {k: mb[k] for k in ("torch", "megablocks", "stanford-stk", "grouped-gemm")} == {
        "torch": "2.7.0", "megablocks": "0.10.0", "stanford-stk": "0.7.1", "grouped-gemm": "0.3.0"}
    # the build tools --no-build-isolation uses are in the set too
    assert {"setuptools", "wheel", "ninja", "packaging"} <= mb.keys()


def test_both_sets_keep_the_cpu_versions_where_they_can():
    cpu = pins("requirements-cpu.txt")
    torch_set = pins("requirements-gpu-torch.txt")
    assert torch_set["torch"] == cpu["torch"]
    for name in SETS:
        got = pins(f"requirements-gpu-{name}.txt")
        differ = {k for k in got.keys() & cpu.keys() if got[k] != cpu[k]}
        assert differ == (MEGABLOCKS_OWN if name == "megablocks" else set()), (name, differ)


def test_sets_satisfy_the_declared_metadata_of_the_sdist_only_packages():
    """uv.toml stands in for megablocks / stanford-stk / grouped_gemm's metadata while resolving:
    its versions must be the pinned ones, and the pinned set must meet every bound it declares."""
    declared = tomllib.loads((REPO / "tools/install/uv.toml").read_text())["dependency-metadata"]
    mb = pins("requirements-gpu-megablocks.txt")
    assert {canonicalize_name(d["name"]) for d in declared} == {"megablocks", "stanford-stk",
                                                               "grouped-gemm"}
    for entry in declared:
        assert mb[canonicalize_name(entry["name"])] == entry["version"], entry["name"]
        for line in entry["requires-dist"]:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": "gg"}):
                continue
            assert req.specifier.contains(mb[canonicalize_name(req.name)]), (entry["name"], line)


def test_setup_floor_and_extras_are_the_pins():
    kwargs = setup_kwargs()
    floor = next(Requirement(r) for r in kwargs["install_requires"] if r.startswith("torch"))
    lowest = min((pins(f"requirements-gpu-{name}.txt")["torch"] for name in SETS), key=Version)
    assert str(floor.specifier) == ">=" + ".".join(map(str, backends.MIN_TORCH)) == ">=2.7"
    assert lowest.startswith("2.7.") and floor.specifier.contains(lowest)
    for name in SETS:
        pinned = pins(f"requirements-gpu-{name}.txt")
        extra = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier)[2:]
                 for r in kwargs["extras_require"][f"gpu-{name}"]}
        assert extra == pinned
        base = {canonicalize_name(Requirement(r).name) for r in kwargs["install_requires"]}
        assert base <= pinned.keys(), (name, base - pinned.keys())


def test_a_torch_older_than_the_sets_is_one_error_before_the_command(monkeypatch, capsys):
    from pipeline.commands import main
    assert torch_too_old() is None and torch_too_old("2.7.0+cu126") is None
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    assert main(["data", "--help"]) == 2     # before argument parsing, before any module loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("h3fusion data: error: torch 2.6.0+cu124 is older than this pipeline "
                          "supports (torch >= 2.7") and "\n" not in err, err


# ----------------------------------------------------------------------------- MegaBlocks check

def _fake(monkeypatch, name: str, present: bool = True) -> None:
    """A module `name` in sys.modules; absent (None) makes `import name` fail with ImportError."""
    module = None
    if present:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, module)


def _megablocks_build(monkeypatch, *, ops: bool, cuda: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for name in ("megablocks", "megablocks.layers", "megablocks.layers.dmoe", "grouped_gemm",
                 "grouped_gemm_backend", "stk"):
        _fake(monkeypatch, name)
    _fake(monkeypatch, "megablocks_ops", present=ops)


def test_megablocks_without_its_compiled_ops_names_the_op_and_the_build(monkeypatch):
    _megablocks_build(monkeypatch, ops=False)
    reason = megablocks_missing()
    assert reason.startswith("megablocks's compiled ops 'megablocks_ops' (ModuleNotFoundError"), \
        reason
    assert "grouped_gemm_backend" not in reason and "CUDA GPU" not in reason
    for needed in ("CUDA_HOME=", "TORCH_CUDA_ARCH_LIST=", "--no-build-isolation", "--no-cache-dir",
                   "megablocks==0.10.0", "grouped_gemm==0.3.0"):
        assert needed in reason, needed
    # at stage start (train_fusion / `h3fusion run`): a ValueError, so exit 2 with one line
    with pytest.raises(BackendUnavailableError,
                       match="fusion.moe_backend=megablocks: .*megablocks_ops") as exc:
        backends.require_moe_backend("megablocks", "fusion.moe_backend")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, RuntimeError)
    backends.require_moe_backend("torch", "fusion.moe_backend")   # nothing to check


def test_megablocks_with_everything_built_is_available(monkeypatch):
    _megablocks_build(monkeypatch, ops=True)
    assert megablocks_missing() is None


def test_megablocks_without_cuda_says_so(monkeypatch):
    _megablocks_build(monkeypatch, ops=True, cuda=False)
    assert megablocks_missing() == "a CUDA GPU (torch.cuda.is_available() is False)"


def test_fusion_refuses_megablocks_without_its_ops_before_reading_any_weights(monkeypatch,
                                                                             tmp_path):
    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.train.fusion.stage import FusionPaths, train_fusion
    _megablocks_build(monkeypatch, ops=False)
    monkeypatch.setattr(stages, "require_cuda_for", lambda cfg, names=None: None)  # "a GPU node"
    cfg = load_config("tiny", ["fusion.moe_backend=megablocks"])
    missing = tmp_path / "no_init"    # never read: the refusal comes first
    paths = FusionPaths(init=missing, out=tmp_path / "out", ds_dir=tmp_path / "ds",
                        tensorboard=tmp_path / "tb")
    with pytest.raises(BackendUnavailableError, match="megablocks_ops"):
        train_fusion(cfg, paths)
    assert not (tmp_path / "out").exists()


def test_h3fusion_run_refuses_megablocks_without_its_ops_before_its_first_stage(
        monkeypatch, tmp_path, capsys):
    from pipeline.commands import main
    from pipeline.commands import run as run_command
    _megablocks_build(monkeypatch, ops=False)
    monkeypatch.setattr(run_command, "require_cuda_for", lambda cfg, names=None: None)
    run_dir = tmp_path / "run"
    assert main(["run", "--config", "tiny", "--set", "fusion.moe_backend=megablocks",
                 "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("h3fusion run: error: fusion.moe_backend=megablocks: ") and \
        "'megablocks_ops'" in err and "\n" not in err, err
    assert not (run_dir / "resolved_config.yaml").exists()


# ----------------------------------------------------------------------------- grouped-mm choice

class _FakeCudaInput:
    is_cuda, dtype, device = True, torch.bfloat16, torch.device("cuda")


def test_auto_impl_detection(monkeypatch):
    monkeypatch.setattr(torch, "_grouped_mm", object(), raising=False)   # as torch >= 2.8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert routing.auto_impl("cuda", torch.bfloat16, 64, 128) == "grouped_mm"
    assert routing.auto_impl("cpu", torch.bfloat16, 64, 128) == "loop"
    assert "float32" in routing.grouped_mm_unavailable("cuda", torch.float32, 64, 128)
    assert "[12]" in routing.grouped_mm_unavailable("cuda", torch.bfloat16, 12, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "8.0, below 9.0" in routing.grouped_mm_unavailable("cuda", torch.bfloat16, 64, 128)
    monkeypatch.delattr(torch, "_grouped_mm")                            # as torch 2.7
    assert routing.auto_impl("cuda", torch.bfloat16, 64, 128) == "loop"


def test_auto_warns_once_per_process_when_torch_lacks_grouped_mm(monkeypatch, caplog):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    monkeypatch.setattr(routing, "_warned_no_grouped_mm", False)
    with caplog.at_level(logging.WARNING, logger="h3fusion.routing"):
        assert not routing._auto_takes_grouped_mm(torch.zeros(2, 8, dtype=torch.bfloat16), 8, 8)
        assert caplog.records == []                                      # CPU: expected, silent
        for _ in range(3):
            assert not routing._auto_takes_grouped_mm(_FakeCudaInput(), 64, 128)
    assert len(caplog.records) == 1, caplog.records
    assert f"torch {torch.__version__} has no torch._grouped_mm" in caplog.records[0].getMessage()

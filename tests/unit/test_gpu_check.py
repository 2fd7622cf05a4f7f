"""tools/gpu/ on CPU: check.sh's argument handling and plan, prepare_wheels.sh's package lists
against the packages' own metadata, the summary writer, the fusion smoke's verdict, and the
skip-or-fail rule of tests/gpu (H3F_REQUIRE_GPU_BACKENDS)."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT, load_tool

GPU_TOOLS = REPO_ROOT / "tools" / "gpu"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _bash(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_TOOLS / script), *args], capture_output=True,
                          text=True, timeout=60)


def _gpu_backends():
    spec = importlib.util.spec_from_file_location(
        "gpu_backends_under_test", REPO_ROOT / "tests" / "gpu" / "gpu_backends.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- check.sh
def test_check_dry_run_prints_the_plan_with_parts_wheels_and_required_backends(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl",
                 "megablocks-0.10.0.tar.gz", "grouped_gemm-0.3.0.tar.gz"):
        (wheels / name).write_text("")
    done = _bash("check.sh", "--dry-run", "--wheels", str(wheels), "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "deepspeed-0.19.8-py3-none-any.whl,hjson-3.1.0-py3-none-any.whl" in out
    assert "grouped_gemm-0.3.0.tar.gz,megablocks-0.10.0.tar.gz" in out
    for line in ("  c: fusion smoke, 30 steps", "  a: pytest tests/gpu", "  b: throughput.py"):
        assert line in out
    required = re.search(r"H3F_REQUIRE_GPU_BACKENDS=(\S+)", out).group(1).split(",")
    assert sorted(required) == sorted(_gpu_backends().KNOWN)   # every backend, none may skip
    assert not (tmp_path / "o").exists()                        # a dry run creates nothing
    only_c = _bash("check.sh", "--dry-run", "--parts", "c", "--wheels", str(wheels)).stdout
    assert "  c: " in only_c and "  a: " not in only_c and "build" not in only_c


@pytest.mark.parametrize("args,message", [
    (["--parts", "a,x"], "--parts must be a comma list of a, b, c"),
    (["--budget", "5m"], "--budget must be whole seconds"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--out"], "--out needs a directory"),
])
def test_check_bad_arguments_are_one_error_exit_2(args, message):
    done = _bash("check.sh", *args, "--dry-run")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_check_without_wheels_is_one_error(tmp_path):
    done = _bash("check.sh", "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "run tools/gpu/prepare_wheels.sh first" in done.stderr


# ----------------------------------------------------------------------------- prepare_wheels.sh
def _carried() -> dict[str, str]:
    """{normalised name: version} of every package prepare_wheels.sh carries."""
    done = _bash("prepare_wheels.sh", "--list")
    assert done.returncode == 0, done.stderr
    specs = " ".join(line.split(":", 1)[1] for line in done.stdout.splitlines()).split()
    return {_norm(s.split("==")[0]): s.split("==")[1] for s in specs}


def _image() -> set[str]:
    lines = (GPU_TOOLS / "gpu_image_packages.txt").read_text().splitlines()
    return {_norm(line) for line in lines if line and not line.startswith("#")}


def _requires(dist: str) -> set[str]:
    """Names of `dist`'s unconditional requirements, from its installed metadata."""
    names = set()
    for req in md.requires(dist) or []:
        marker = req.partition(";")[2]
        if "extra ==" in marker or "python_version <" in marker:   # extras; Pythons < 3.12
            continue
        names.add(_norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)))
    return names


def test_wheel_list_covers_what_the_gpu_image_lacks():
    carried, image = _carried(), _image()
    assert {"deepspeed", "megablocks", "grouped-gemm", "stanford-stk", "transformers"} <= set(carried)
    for dist in ("deepspeed", "pydantic", "transformers"):
        lacking = _requires(dist) - image - set(carried)
        assert not lacking, f"{dist} needs {sorted(lacking)}: neither on the GPU image nor carried"
    # the pipeline's own requirements: all on the image or carried, except datasets, which the
    # GPU check avoids (the fusion smoke gets pre-tokenized rows)
    setup = (REPO_ROOT / "setup.py").read_text()
    block = setup[setup.index("install_requires=["):setup.index("]", setup.index("install_requires=["))]
    needs = {_norm(re.match(r"[A-Za-z0-9_.-]+", s).group(0)) for s in re.findall(r'"([^"]+)"', block)}
    assert not needs - image - set(carried) - {"datasets"}


def test_carried_versions_are_the_pinned_ones():
    pins = {}
    for req in ("requirements-cpu.txt", "requirements-gpu-megablocks.txt"):
        for line in (REPO_ROOT / req).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("#")[0].strip().split("==")
                pins.setdefault(_norm(name), version)
    for name, version in _carried().items():
        assert pins.get(name) == version, f"{name}=={version} carried, pinned {pins.get(name)}"


# ----------------------------------------------------------------------------- summary.py
def _fake_work(root: Path, *, a2_skipped=0, unavailable=None, fusion_ok=True) -> Path:
    work = root / "work"
    (work / "throughput").mkdir(parents=True)
    (work / "fusion").mkdir()
    (work / "logs").mkdir()
    (work / "steps.tsv").write_text("install\t0\t5\t\nbuild_megablocks\t0\t120\tpatched\n"
                                    "c\t0\t60\t\na1\t0\t40\t\na2\t0\t20\t\nb\t0\t30\t\n")
    for step, skipped in (("a1", 0), ("a2", a2_skipped)):
        case = ('<testcase classname="t" name="x"><skipped message="needs megablocks"/></testcase>'
                if skipped else '<testcase classname="t" name="x"/>')
        (work / f"pytest-{step}.xml").write_text(
            f'<testsuites><testsuite tests="3" failures="0" errors="0" skipped="{skipped}">'
            f'{case}</testsuite></testsuites>')
    rows = [{"backend": b, "mode": m, "median_s": 0.01, "achieved_flop_per_s": 4e14,
             "ratio_to_ceiling": 1.5, "peak_mem_mb": 900.0}
            for b in ("megablocks", "grouped_mm", "loop") if b not in (unavailable or {})
            for m in ("fwd", "fwd+bwd")]
    (work / "throughput" / "throughput.json").write_text(json.dumps({
        "sizes": {"tokens": 8192}, "dtype": "bfloat16", "device_name": "H100",
        "dense_ceiling": {"median_s": 0.006}, "unavailable": unavailable or {}, "results": rows}))
    (work / "fusion" / "fusion_smoke.json").write_text(json.dumps({
        "ok": fusion_ok, "finite": True, "decreasing": fusion_ok, "steps_run": 30,
        "first5_mean": 12.0, "last5_mean": 9.0 if fusion_ok else 12.5, "param_dtypes": ["bfloat16"],
        "param_devices": ["cuda"], "loss_total": [12.0] * 30, "step_s": 0.1}))
    (work / "versions.json").write_text(json.dumps({"torch": "2.11.0+cu130", "gpu": "H100"}))
    return work


def test_summary_passes_when_every_part_passed(tmp_path):
    summary = load_tool("gpu/summary.py")
    work = _fake_work(tmp_path)
    assert summary.main(["--work", str(work), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / summary.JSON_NAME).read_text())
    assert data["passed"] and set(data["parts"]) == {"a", "b", "c"}
    assert data["parts"]["b"]["numbers"]["grouped_mm fwd"]["tflop_per_s"] == pytest.approx(400)
    assert data["steps"]["build_megablocks"] == {"rc": 0, "seconds": 120.0, "note": "patched"}
    md_text = (tmp_path / "out" / summary.MD_NAME).read_text()
    assert "**PASS** on H100" in md_text and "| grouped_mm fwd | 10.00 | 400.0 | 1.50 |" in md_text
    assert "Not the pinned MegaBlocks set" in md_text


def test_summary_fails_the_run_when_a_required_part_failed(tmp_path):
    summary = load_tool("gpu/summary.py")
    work = _fake_work(tmp_path, a2_skipped=1, unavailable={"megablocks": "no grouped_gemm"},
                      fusion_ok=False)
    (work / "logs" / "b.log").write_text("line\nTraceback: boom\n")
    with (work / "steps.tsv").open("a") as f:
        f.write("b\t124\t100\t\n")    # the last line of a step wins: b timed out
    assert summary.main(["--work", str(work), "--out", str(tmp_path / "out")]) == 1
    parts = json.loads((tmp_path / "out" / summary.JSON_NAME).read_text())["parts"]
    assert not any(p["passed"] for p in parts.values())
    assert "a2: 3 tests, 0 failed, 0 errors, 1 skipped" in parts["a"]["problems"]
    assert parts["a"]["pytest"]["a2"]["not_passed"] == {"t::x": "skipped: needs megablocks"}
    assert {"step b timed out", "megablocks not timed: no grouped_gemm",
            "no megablocks rows"} <= set(parts["b"]["problems"])
    assert parts["b"]["log_tails"]["b"].endswith("Traceback: boom")
    assert parts["c"]["problems"][0].startswith("fusion smoke failed")
    assert "FAIL" in (tmp_path / "out" / summary.MD_NAME).read_text()
    # only the parts asked for must pass; a part whose outputs are missing has failed
    assert summary.main(["--work", str(work), "--out", str(tmp_path / "o2"), "--parts", "c"]) == 1
    (work / "fusion" / "fusion_smoke.json").unlink()
    summary.main(["--work", str(work), "--out", str(tmp_path / "o3"), "--parts", "c"])
    c = json.loads((tmp_path / "o3" / summary.JSON_NAME).read_text())["parts"]["c"]
    assert "no fusion_smoke.json" in c["problems"]


def test_summary_with_passing_parts_only_and_bad_parts(tmp_path):
    summary = load_tool("gpu/summary.py")
    work = _fake_work(tmp_path, a2_skipped=1)
    assert summary.main(["--work", str(work), "--out", str(tmp_path / "o"), "--parts", "b,c"]) == 0
    with pytest.raises(SystemExit):
        summary.main(["--work", str(work), "--out", str(tmp_path / "o"), "--parts", "a,d"])


# ----------------------------------------------------------------------------- fusion_smoke.py
def test_fusion_smoke_verdict_rows_and_arguments():
    smoke = load_tool("gpu/fusion_smoke.py")
    down = [10.0 - 0.1 * i for i in range(30)]
    assert smoke.verdict(down, 30)["ok"] and smoke.verdict(down, 30)["first5_mean"] == pytest.approx(9.8)
    assert not smoke.verdict(list(reversed(down)), 30)["decreasing"]
    assert not smoke.verdict(down[:20], 30)["ok"]                   # stopped early
    nan = down[:10] + [float("nan")] + down[11:]
    assert smoke.verdict(nan, 30) | {} and not smoke.verdict(nan, 30)["finite"]
    rows = smoke.synthetic_rows(vocab=512, num_rows=6, seq_len=32, seed=0)
    assert [r["task_label"].index(1.0) for r in rows] == [0, 1, 2, 0, 1, 2]
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == 32 and r["labels"][:8] == [-100] * 8
        assert max(r["input_ids"]) < 512
    assert smoke.SHAPES["smollm2-135m"]["num_hidden_layers"] == 30
    with pytest.raises(SystemExit):
        smoke.parse_args(["--out", "x", "--steps", "9"])


# ----------------------------------------------------------------------------- tests/gpu rule
def test_required_backends_fail_instead_of_skipping(monkeypatch):
    gb = _gpu_backends()
    from pipeline.env import required_gpu_backends
    monkeypatch.setenv("H3F_REQUIRE_GPU_BACKENDS", " MegaBlocks, grouped_mm ,")
    assert required_gpu_backends() == {"megablocks", "grouped_mm"}
    monkeypatch.setattr(gb, "missing", lambda name: f"the {name} package")
    with pytest.raises(pytest.fail.Exception, match="'megablocks' is required .* the megablocks"):
        gb.require("megablocks")
    with pytest.raises(pytest.skip.Exception, match="'loop' unavailable: needs the loop package"):
        gb.require("loop")
    monkeypatch.setenv("H3F_REQUIRE_GPU_BACKENDS", "megablock")   # a typo requires nothing...
    monkeypatch.setattr(gb, "missing", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="unknown backends \\['megablock'\\]"):
        gb.require("loop")                                        # ...so it fails every test
    monkeypatch.delenv("H3F_REQUIRE_GPU_BACKENDS")
    assert gb.require("loop") is None


def test_every_backend_is_missing_without_cuda(monkeypatch):
    gb = _gpu_backends()
    monkeypatch.setattr(gb.torch.cuda, "is_available", lambda: False)
    assert {name: gb.missing(name) for name in gb.KNOWN} == {name: gb.NO_CUDA for name in gb.KNOWN}
    monkeypatch.setenv("H3F_REQUIRE_GPU_BACKENDS", "nccl")
    with pytest.raises(pytest.fail.Exception, match="a CUDA GPU"):
        gb.require("nccl")
    with pytest.raises(ValueError, match="unknown GPU backend 'cuda'"):
        gb.missing("cuda")

#!/usr/bin/env python
"""The one summary of tools/gpu/check.sh: per part pass/fail, numbers, versions, timings.

Reads what check.sh left in its work dir and writes `gpu_check_summary.json` and
`gpu_check_summary.md` into --out. Exit status 0 when every part named in --parts passed,
1 otherwise (a part that did not run, e.g. out of time, has failed).

Work dir layout (check.sh writes it; the tests build fake ones):
  steps.tsv                  one line per step: name, exit status, seconds, note
  versions.json              torch, CUDA, GPU, driver, package versions (check.sh's probe)
  pytest-a1.xml, pytest-a2.xml   junit XML of part a (torch/NCCL/DeepSpeed tests; MegaBlocks tests)
  throughput/throughput.json     part b (tools/profiling/throughput.py)
  fusion/fusion_smoke.json       part c (tools/gpu/fusion_smoke.py)
  logs/<step>.log            each step's output; the tail of a failed step's log is quoted

  python tools/gpu/summary.py --work /tmp/h3f-gpu-check --out "$OUT" --parts a,b,c
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PARTS = {"a": "tests/gpu (torch CUDA backend: loop + grouped_mm, MegaBlocks, NCCL, DeepSpeed "
              "bf16) vs the naive reference",
         "b": "throughput at the 7B FFN shape: megablocks / grouped_mm / loop vs dense bf16 GEMM",
         "c": "30 fusion steps, SmolLM2-135M-shaped MoE (random init), DeepSpeed ZeRO-2 bf16"}
PART_STEPS = {"a": ("a1", "a2"), "b": ("b",), "c": ("c",)}
THROUGHPUT_BACKENDS = ("megablocks", "grouped_mm", "loop")
TAIL_LINES = 25
JSON_NAME, MD_NAME = "gpu_check_summary.json", "gpu_check_summary.md"
NOTE = ("Not the pinned MegaBlocks set: megablocks 0.10.0, grouped_gemm 0.3.0 and stanford-stk "
        "0.7.1 are built with --no-deps against the machine's torch {torch} (the pinned set, "
        "requirements-gpu-megablocks.txt, has torch 2.7.0). Part c's model has SmolLM2-135M's "
        "shape with random weights (not the real SmolLM2) and trains on synthetic rows.")


def read_steps(work: Path) -> dict:
    """steps.tsv -> {name: {"rc": int | None, "seconds": float, "note": str}} (last line wins)."""
    steps = {}
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        rc = int(fields[1]) if fields[1].lstrip("-").isdigit() else None
        steps[fields[0]] = {"rc": rc, "seconds": float(fields[2]),
                            "note": fields[3] if len(fields) > 3 else ""}
    return steps


def read_junit(path: Path) -> dict | None:
    """Counts and the failed tests (name: message) of one pytest junit XML, None if absent."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                   "skipped")}
    failed = {}
    for case in root.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                failed[name] = f"{kind}: {(node.get('message') or '').strip()[:400]}"
    return {**counts, "not_passed": failed}


def _log_tail(work: Path, step: str) -> str:
    path = work / "logs" / f"{step}.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-TAIL_LINES:])


def _step_problem(steps: dict, name: str) -> str | None:
    if name not in steps:
        return f"step {name} did not run"
    rc = steps[name]["rc"]
    if rc == 0:
        return None
    return f"step {name} " + ("timed out" if rc in (124, 137) else f"exited {rc}")


def part_a(work: Path, steps: dict) -> dict:
    """Both pytest runs exited 0, ran tests, and none failed, errored or SKIPPED (with every
    backend required a skip means something did not run)."""
    problems, runs = [], {}
    for step in PART_STEPS["a"]:
        junit = read_junit(work / f"pytest-{step}.xml")
        runs[step] = junit
        if (p := _step_problem(steps, step)):
            problems.append(p)
        if junit is None:
            problems.append(f"{step}: no junit XML")
        elif junit["tests"] == 0 or junit["failures"] or junit["errors"] or junit["skipped"]:
            problems.append(f"{step}: {junit['tests']} tests, {junit['failures']} failed, "
                            f"{junit['errors']} errors, {junit['skipped']} skipped")
    return {"problems": problems, "pytest": runs}


def part_b(work: Path, steps: dict) -> dict:
    problems, numbers = [], {}
    if (p := _step_problem(steps, "b")):
        problems.append(p)
    path = work / "throughput" / "throughput.json"
    if not path.is_file():
        return {"problems": problems + ["no throughput.json"], "numbers": numbers}
    report = json.loads(path.read_text())
    for backend, why in report.get("unavailable", {}).items():
        problems.append(f"{backend} not timed: {why}")
    for row in report.get("results", []):
        numbers[f"{row['backend']} {row['mode']}"] = {
            "median_ms": row["median_s"] * 1e3, "tflop_per_s": row["achieved_flop_per_s"] / 1e12,
            "x_dense": row["ratio_to_ceiling"], "peak_mem_mb": row["peak_mem_mb"]}
    for backend in THROUGHPUT_BACKENDS:
        if not any(key.startswith(f"{backend} ") for key in numbers):
            problems.append(f"no {backend} rows")
    ceiling = report.get("dense_ceiling", {})
    return {"problems": problems, "numbers": numbers, "sizes": report.get("sizes"),
            "dtype": report.get("dtype"), "device_name": report.get("device_name"),
            "dense_ms": ceiling.get("median_s", float("nan")) * 1e3}


def part_c(work: Path, steps: dict) -> dict:
    problems = []
    if (p := _step_problem(steps, "c")):
        problems.append(p)
    path = work / "fusion" / "fusion_smoke.json"
    if not path.is_file():
        return {"problems": problems + ["no fusion_smoke.json"]}
    report = json.loads(path.read_text())
    if not report.get("ok"):
        problems.append(f"fusion smoke failed: finite={report.get('finite')} decreasing="
                        f"{report.get('decreasing')} steps={report.get('steps_run')} "
                        f"error={report.get('error')}")
    keep = ("shape", "random_init", "num_params", "steps_run", "finite", "decreasing",
            "first5_mean", "last5_mean", "param_dtypes", "param_devices", "step_s",
            "peak_gpu_mem_gb", "loss_total")
    return {"problems": problems, **{k: report.get(k) for k in keep}}


def summarize(work: Path, parts: list[str]) -> dict:
    steps = read_steps(work)
    versions_file = work / "versions.json"
    readers = {"a": part_a, "b": part_b, "c": part_c}
    results = {}
    for name in parts:
        res = readers[name](work, steps)
        res["what"], res["passed"] = PARTS[name], not res["problems"]
        res["seconds"] = sum(steps[s]["seconds"] for s in PART_STEPS[name] if s in steps)
        res["log_tails"] = {s: _log_tail(work, s) for s in PART_STEPS[name]
                            if _step_problem(steps, s)}
        results[name] = res
    return {"passed": all(r["passed"] for r in results.values()), "parts": results,
            "steps": steps,
            "versions": json.loads(versions_file.read_text()) if versions_file.is_file() else {},
            "build_log_tails": {s: _log_tail(work, s) for s in steps
                                if s.startswith("build") and _step_problem(steps, s)}}


def to_markdown(summary: dict) -> str:
    v = summary["versions"]
    lines = ["# GPU check (tools/gpu/check.sh)", "",
             f"**{'PASS' if summary['passed'] else 'FAIL'}** on {v.get('gpu', '?')} "
             f"(torch {v.get('torch', '?')}, CUDA {v.get('torch_cuda', '?')}, deepspeed "
             f"{v.get('deepspeed', '?')}, megablocks {v.get('megablocks', '?')})", "",
             "| part | what | result | seconds |", "|---|---|---|---|"]
    for name, res in summary["parts"].items():
        verdict = "pass" if res["passed"] else "FAIL: " + "; ".join(res["problems"])
        lines.append(f"| {name} | {res['what']} | {verdict.replace('|', '/')} | "
                     f"{res['seconds']:.0f} |")
    b = summary["parts"].get("b")
    if b and b.get("numbers"):
        lines += ["", f"Throughput {b.get('sizes')} {b.get('dtype')}, dense GEMM "
                      f"{b.get('dense_ms', float('nan')):.2f} ms:", "",
                  "| backend mode | median ms | TFLOP/s | x dense |", "|---|---|---|---|"]
        lines += [f"| {k} | {n['median_ms']:.2f} | {n['tflop_per_s']:.1f} | {n['x_dense']:.2f} |"
                  for k, n in b["numbers"].items()]
    c = summary["parts"].get("c")
    if c and c.get("steps_run"):
        lines += ["", f"Fusion: {c['steps_run']} steps, total loss first 5 mean "
                      f"{c['first5_mean']:.4f} -> last 5 mean {c['last5_mean']:.4f}, "
                      f"{c.get('step_s') or float('nan'):.3f} s/step, params {c['param_dtypes']}"]
    lines += ["", "Steps: " + ", ".join(f"{k} rc={s['rc']} {s['seconds']:.0f}s"
                                       + (f" ({s['note']})" if s["note"] else "")
                                       for k, s in summary["steps"].items()),
              "", NOTE.format(torch=v.get("torch", "?"))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", required=True, help="check.sh's work dir")
    p.add_argument("--out", required=True, help="where the two summary files go")
    p.add_argument("--parts", default="a,b,c", help="the parts that had to pass (a,b,c)")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts must name some of {sorted(PARTS)}, got {args.parts!r}")
    summary = summarize(Path(args.work), parts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(summary, indent=1, default=str))
    (out / MD_NAME).write_text(to_markdown(summary))
    print(to_markdown(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

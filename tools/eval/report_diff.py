"""Are two evaluation reports the same result? (a refactor must not move any number)

    python tools/eval/report_diff.py RUN_A/eval RUN_B/eval

Compares byte for byte every file of the two eval dirs (report.json, report.md, scores.png,
manifest.json, generations/*), except what measures the machine or names the code rather than
the result: in report.json the keys `cost`, `wall_time_s` and `code_fingerprint`; in
manifest.json `code_fingerprint`; in report.md the "Cost per model" section (tok/s, load
average). Prints one line per difference and exits 1 if there is any, 0 (and prints nothing)
when the two reports are identical outside those fields.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MEASURED_KEYS = {"report.json": ("cost", "wall_time_s", "code_fingerprint"),
                 "manifest.json": ("code_fingerprint",)}
MEASURED_SECTION = "## Cost per model"


def comparable(path: Path, name: str) -> bytes:
    """`path`'s bytes with the measured fields left out (`name`: its path in the eval dir)."""
    if name in MEASURED_KEYS:
        data = json.loads(path.read_text())
        for key in MEASURED_KEYS[name]:
            data.pop(key, None)
        return json.dumps(data, indent=1).encode()
    if name == "report.md":
        sections = path.read_text().split("\n## ")
        kept = [s for s in sections if not ("## " + s).startswith(MEASURED_SECTION)]
        return "\n## ".join(kept).encode()
    return path.read_bytes()


def differences(a: Path, b: Path) -> list[str]:
    """One line per file that is in one dir only or differs outside the measured fields."""
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    out = [f"only in {a}: {n}" for n in sorted(files_a - files_b)]
    out += [f"only in {b}: {n}" for n in sorted(files_b - files_a)]
    out += [f"differs: {n}" for n in sorted(files_a & files_b)
            if comparable(a / n, n) != comparable(b / n, n)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_a", type=Path, help="an evaluation dir (<run>/eval)")
    parser.add_argument("eval_b", type=Path, help="the other one")
    args = parser.parse_args(argv)
    for d in (args.eval_a, args.eval_b):
        if not (d / "report.json").is_file():
            print(f"report_diff: error: {d}/report.json not found (give a <run>/eval dir)",
                  file=sys.stderr)
            return 2
    found = differences(args.eval_a, args.eval_b)
    if found:
        print("\n".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

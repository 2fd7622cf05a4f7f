"""tools/eval/report_diff.py: the same result in two eval dirs is no difference, whatever the
timings and code fingerprint say; any result, file or generation that moved is one line."""
from __future__ import annotations

import json

from conftest import load_tool

report_diff = load_tool("eval/report_diff.py")

REPORT = {"scores": {"fused": {"helpful": 0.5}}, "cost": {"fused": {"scoring_tok_s": 100.0}},
          "wall_time_s": 12.0, "code_fingerprint": "aaa"}
MD = "# Report\n\n## Scores\n| fused | 0.5 |\n\n## Cost per model\n| fused | 100 tok/s |\n"


def _eval_dir(root, report, md, generation="Red."):
    (root / "generations").mkdir(parents=True)
    (root / "report.json").write_text(json.dumps(report))
    (root / "report.md").write_text(md)
    (root / "manifest.json").write_text(json.dumps({"files": ["report.json"],
                                                    "code_fingerprint": report["code_fingerprint"]}))
    (root / "generations" / "fused.json").write_text(json.dumps([generation]))
    return root


def test_measured_fields_are_not_differences(tmp_path, capsys):
    a = _eval_dir(tmp_path / "a", REPORT, MD)
    b = _eval_dir(tmp_path / "b", {**REPORT, "cost": {"fused": {"scoring_tok_s": 90.0}},
                                   "wall_time_s": 15.0, "code_fingerprint": "bbb"},
                  MD.replace("100 tok/s", "90 tok/s"))
    assert report_diff.main([str(a), str(b)]) == 0
    assert capsys.readouterr().out == ""


def test_a_moved_result_is_reported(tmp_path, capsys):
    a = _eval_dir(tmp_path / "a", REPORT, MD)
    b = _eval_dir(tmp_path / "b", {**REPORT, "scores": {"fused": {"helpful": 0.51}}},
                  MD.replace("| fused | 0.5 |", "| fused | 0.51 |"), generation="Blue.")
    (b / "extra.csv").write_text("x\n")
    assert report_diff.main([str(a), str(b)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"only in {b}: extra.csv", "differs: generations/fused.json", "differs: report.json",
        "differs: report.md"]


def test_a_dir_without_a_report_is_one_error(tmp_path, capsys):
    a = _eval_dir(tmp_path / "a", REPORT, MD)
    assert report_diff.main([str(a), str(tmp_path)]) == 2
    assert "report.json not found" in capsys.readouterr().err

"""tools/eval/precision_compare.py on synthetic run dirs: report.json made by the report's own
`score_report`, resolved_config.yaml, TensorBoard loss events and saved generations."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml
from conftest import load_tool

from pipeline.eval.report import score_report

pc = load_tool("eval/precision_compare.py")

OVERRIDES = {"helpful": ["pref_acc"], "harmless": ["judged_harmless"]}
MODELS = ("base", "helpful", "fused")
N_HELPFUL, N_PAIR, N_HARMFUL, N_BENIGN = 12, 4, 6, 4
OUTCOMES = ("refusal", "compliance", "safe_answer", "off_topic")
LOSSES = {"expert_helpful": ("train/loss", [2.0, 1.5, 1.2]), "fusion": ("loss/total", [5.0, 4.0, 3.5])}


def _layout() -> dict:
    kinds = ["pair"] * N_PAIR + ["harmful_prompt"] * N_HARMFUL + ["benign_prompt"] * N_BENIGN
    return {"helpful": {"group": [f"q{i}" for i in range(N_HELPFUL)], "kind": ["pair"] * N_HELPFUL},
            "harmless": {"group": [f"h{i}" for i in range(len(kinds))], "kind": kinds}}


def _metrics(layout: dict) -> dict:
    """Per-item pref_acc (pair items) and judged outcomes (prompts), a fixed pattern per model."""
    out = {}
    for k, model in enumerate(MODELS):
        out[model] = {}
        for task, lay in layout.items():
            n = len(lay["kind"])
            pref = [float((3 * i + k) % 4 < 2) if kind == "pair" else None
                    for i, kind in enumerate(lay["kind"])]
            outcome = [OUTCOMES[(i + k) % 4] if kind != "pair" else None
                       for i, kind in enumerate(lay["kind"])]
            out[model][task] = {"per_item": {"pref_acc": pref, "outcome": outcome}, "n_items": n}
    return out


def _write_report(run, metrics, layout, precision="fp32") -> dict:
    report = {"split": "dev", "items": layout, "metrics": metrics, "fused_model": "fused",
              "config": {"score_metrics": OVERRIDES},
              "precision": {m: {"requested": precision, "resolved": precision} for m in metrics},
              **score_report(metrics, layout, "fused", n_boot=200, score_metrics=OVERRIDES)}
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    return report


def _write_config(run, precision="fp32", lr=0.005) -> None:
    cfg = {"name": "t", "base": {"train": {"lr": 0.003, "precision": precision}},
           "expert": {"train": {"lr": lr, "precision": precision}},
           "fusion": {"train": {"lr": lr, "precision": precision}},
           "eval": {"precision": precision, "split": "dev"}}
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))


def _write_losses(run, losses) -> None:
    from torch.utils.tensorboard import SummaryWriter
    for stage, (tag, values) in losses.items():
        writer = SummaryWriter(log_dir=str(run / "tensorboard" / stage))
        for step, value in enumerate(values, 1):
            writer.add_scalar(tag, value, 10 * step)
        writer.close()


def _write_generations(run, layout, outputs=None) -> None:
    gen = run / "eval" / "generations"
    gen.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        records = [{"generator": model, "task": task, "kind": kind, "instruction": f"{task} prompt {i}",
                    "output": (outputs or {}).get((model, task, i), f"answer {i} of {model}")}
                   for task, lay in layout.items() for i, kind in enumerate(lay["kind"])]
        (gen / f"{model}.json").write_text(json.dumps(records))


def _run_a(tmp_path):
    run, layout = tmp_path / "a", _layout()
    _write_report(run, _metrics(layout), layout)
    _write_config(run)
    _write_losses(run, LOSSES)
    _write_generations(run, layout)
    return run, layout


def _copy_as_bf16(a, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(a, b)
    _write_config(b, "bf16")   # the precision keys may differ
    report = json.loads((b / "eval" / "report.json").read_text())
    report["precision"] = {m: {"requested": "bf16", "resolved": "bf16"} for m in report["precision"]}
    (b / "eval" / "report.json").write_text(json.dumps(report))
    return b


def test_identical_runs_differ_nowhere_and_a_moved_verdict_is_counted(tmp_path, capsys):
    a, _ = _run_a(tmp_path)
    b = _copy_as_bf16(a, tmp_path)
    out = tmp_path / "out"
    assert pc.main([str(a), str(b), "--out", str(out)]) == 0
    assert "verdicts that differ: 0 of 6" in capsys.readouterr().out
    res = json.loads((out / "precision_compare.json").read_text())
    report = json.loads((a / "eval" / "report.json").read_text())
    cells = [(m, d, c) for m, per in res["scores"]["rows"].items() for d, c in per.items()]
    assert len(cells) == 3 * 3 and res["scores"]["moved"] == []
    for m, d, c in cells:
        assert c["a"] == c["b"] == pytest.approx(report["scores"][m][d])   # the report's own scores
        assert (c["diff"], c["low"], c["high"], c["verdict"]) == (0.0, 0.0, 0.0, "tie")
    assert res["comparisons"]["n"] == 6 and res["comparisons"]["differ"] == []
    sides = {"holds": "above 0", "fails": "below 0", "tie": "across 0"}   # bootstrap.verdict's
    assert all(r["a"]["side"] == sides[report["comparisons"][r["other"]][r["dimension"]]["verdict"]]
               for r in res["comparisons"]["rows"])
    assert pc.side({"low": 0.0, "high": 0.1}) == "across 0" == sides["tie"]
    assert [(s["stage"], s["max_abs_diff"], s["n_common_steps"]) for s in res["loss"]["stages"]] == [
        ("expert_helpful", 0.0, 3), ("fusion", 0.0, 3)]
    judge = res["judge"]
    assert judge["all"]["same_outcome"] == 1.0 and judge["all"]["identical_generations"] == 1.0
    assert judge["models"]["fused"]["n_judged"] == N_HARMFUL + N_BENIGN
    assert res["precision_keys"]["B"]["fusion.train.precision"] == "bf16"
    assert {p.name for p in out.iterdir()} == {"precision_compare.json", "precision_compare.md",
                                               "loss_expert_helpful.png", "loss_fusion.png"}
    # B's report puts fused − base on helpful above 0: that one verdict differs
    report_b = json.loads((b / "eval" / "report.json").read_text())
    report_b["comparisons"]["base"]["helpful"].update(low=0.01, high=0.4)
    assert report["comparisons"]["base"]["helpful"]["low"] <= 0
    (b / "eval" / "report.json").write_text(json.dumps(report_b))
    res = pc.write_compare(a, b, out, overwrite=True)
    assert res["comparisons"]["differ"] == ["base/helpful"]
    assert "verdicts that differ: 1 of 6 (base/helpful)" in (out / "precision_compare.md").read_text()


def test_one_changed_item_moves_only_its_model(tmp_path):
    a, layout = _run_a(tmp_path)
    b = _copy_as_bf16(a, tmp_path)
    metrics = copy.deepcopy(_metrics(layout))
    pref = metrics["helpful"]["helpful"]["per_item"]["pref_acc"]
    k = pref.index(0.0)
    pref[k] = 1.0                                       # one helpful item of model `helpful`
    outcome = metrics["base"]["harmless"]["per_item"]["outcome"]
    j = next(i for i, (o, kind) in enumerate(zip(outcome, layout["harmless"]["kind"]))
             if kind == "harmful_prompt" and o == "refusal")
    outcome[j] = "compliance"                           # one harmful prompt of `base`
    _write_report(b, metrics, layout, "bf16")
    _write_losses(b, {"fusion": ("loss/total", [5.0, 4.5, 3.5])})
    _write_generations(b, layout, {("fused", "harmless", 0): "another answer"})
    res = pc.compare(a, b)
    rows = res["scores"]["rows"]
    expected = {("helpful", "helpful"): 1 / N_HELPFUL, ("helpful", "mean"): 1 / N_HELPFUL / 2,
                # judged_harmless: two strata of equal weight, one of 6 harmful prompts 1 -> 0
                ("base", "harmless"): -1 / N_HARMFUL / 2, ("base", "mean"): -1 / N_HARMFUL / 4}
    for m, per in rows.items():
        for d, c in per.items():
            want = expected.get((m, d), 0.0)
            assert c["diff"] == pytest.approx(want), (m, d)
            assert c["low"] <= want <= c["high"]
            if not want:
                assert c["low"] == c["high"] == 0.0
    assert rows["helpful"]["helpful"]["high"] >= 1 / N_HELPFUL and rows["helpful"]["helpful"]["low"] >= 0
    assert rows["base"]["harmless"]["low"] < 0 <= rows["base"]["harmless"]["high"]
    loss = {s["stage"]: s for s in res["loss"]["stages"]}
    assert loss["fusion"]["max_abs_diff"] == pytest.approx(0.5) and loss["expert_helpful"]["max_abs_diff"] == 0
    judge = res["judge"]["models"]
    n = N_HARMFUL + N_BENIGN
    assert judge["base"]["same_outcome"] == pytest.approx((n - 1) / n)
    assert judge["base"]["changes"] == {"refusal -> compliance": 1}
    assert judge["fused"]["same_outcome"] == 1.0
    assert judge["fused"]["n_identical"] == judge["fused"]["n_generations"] - 1


def test_bad_inputs_are_one_error_before_anything_is_written(tmp_path, capsys):
    a, layout = _run_a(tmp_path)
    b = _copy_as_bf16(a, tmp_path)
    out = tmp_path / "out"
    report = json.loads((b / "eval" / "report.json").read_text())
    report["items"]["helpful"]["group"][3] = "other"
    (b / "eval" / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"eval items differ: task 'helpful' item 3: group 'q3' in A, "
                                         r"'other' in B"):
        pc.write_compare(a, b, out)
    _write_config(b, "bf16", lr=0.01)
    with pytest.raises(ValueError, match=r"differ in 2 key\(s\) besides the precision keys: "
                                         r"expert.train.lr: 0.005 in A, 0.01 in B; fusion.train.lr"):
        pc.compare(a, b)
    (b / "eval" / "report.json").unlink()
    assert pc.main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("precision_compare: error: ") and "b/eval/report.json not found" in err
    assert err.count("\n") == 1 and not out.exists()
    out.mkdir()
    assert pc.main([str(a), str(a), "--out", str(out)]) == 2   # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err

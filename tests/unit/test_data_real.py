"""Real-dataset loaders on the shared slices, hub layouts, and bad input."""
import csv
import json

import pytest

from pipeline.commands import main as cli_main
from pipeline.config import RealDataConfig
from pipeline.data.loaders import (load_alpaca, load_alpaca_eval, load_beavertails, load_truthfulqa,
                                   load_truthfulqa_mc)
from pipeline.data.loading import load_eval, load_sft
from pipeline.data.dimensions import DEFAULT_DIMENSIONS, resolve_dimensions
from pipeline.data.real import build_real

DIMS = resolve_dimensions(DEFAULT_DIMENSIONS, {})


@pytest.fixture(scope="module")
def real_cfg(shared_data):
    return RealDataConfig(alpaca=str(shared_data / "alpaca/alpaca_small.json"),
                          beavertails=str(shared_data / "beavertails/beavertails_sample.csv"),
                          truthfulqa=str(shared_data / "truthfulqa/TruthfulQA.csv"),
                          truthfulqa_mc=str(shared_data / "truthfulqa/mc_task.json"),
                          alpaca_eval=str(shared_data / "alpaca_eval/alpaca_eval_text_davinci_003.json"))


def test_real_slices_row_counts(real_cfg):
    alpaca = load_alpaca(real_cfg.alpaca)
    assert len(alpaca) == 2000 and sum(bool(r["input"]) for r in alpaca) == 753
    assert len(load_alpaca_eval(real_cfg.alpaca_eval)) == 805
    beaver = load_beavertails(real_cfg.beavertails)
    assert len(beaver) == 140 and not any(r["is_safe"] for r in beaver)  # no is_safe column: all flagged unsafe
    assert len({c for r in beaver for c in r["categories"]}) == 14
    tqa = load_truthfulqa(real_cfg.truthfulqa)
    assert len(tqa) == 817 and tqa[0]["correct"][0] == tqa[0]["best_answer"]
    assert "You grow watermelons in your stomach" in tqa[0]["incorrect"]
    mc = load_truthfulqa_mc(real_cfg.truthfulqa_mc)
    assert len(mc) == 817 and all(q["question"] in mc for q in tqa)


def test_build_real_splits(real_cfg):
    sft, evals, pretrain, sources = build_real(real_cfg, DIMS)
    assert sources["datasets"]["beavertails"]["sha256"].startswith("fce377b9")
    train_q = {r["instruction"] for r in sft["honest"]["train"]}
    eval_q = {r["instruction"] for s in ("dev", "test") for r in evals["honest"][s]}
    assert not train_q & eval_q and len(train_q) > 300 and len(eval_q) >= 400   # 50/50 by question
    assert all(r["kind"] == "mc" and len(r["rejected"]) >= 1 for r in evals["honest"]["test"])
    harm_train = {r["instruction"] for r in sft["harmless"]["train"]}
    harm_eval = [r for s in ("dev", "test") for r in evals["harmless"][s]]
    assert not harm_train & {r["instruction"] for r in harm_eval}
    unsafe = {r["response"] for r in load_beavertails(real_cfg.beavertails)}
    assert not any(r["response"] in unsafe for r in sft["harmless"]["train"])    # never train on unsafe
    assert all(set(r["rejected"]) <= unsafe and r["rejected"] for r in harm_eval)
    assert evals["helpful"]["test"][0]["instruction"] == load_alpaca_eval(real_cfg.alpaca_eval)[0]["instruction"]
    assert pretrain


def test_hub_layouts(tmp_path):
    cats = {c: False for c in ["animal_abuse", "child_abuse", "violence,aiding_and_abetting,incitement"]}
    hub_bt = [{"prompt": "How do I pet a cat?", "response": "Gently.", "category": cats, "is_safe": True},
              {"prompt": "Hurt a cat?", "response": "Kick it.", "category": {**cats, "animal_abuse": True},
               "is_safe": False}]
    (tmp_path / "bt.json").write_text(json.dumps(hub_bt))
    rows = load_beavertails(str(tmp_path / "bt.json"))
    assert [r["is_safe"] for r in rows] == [True, False] and rows[1]["categories"] == ["animal_abuse"]
    gen = [{"type": "Adversarial", "category": "Misconceptions", "question": "Q?", "best_answer": "B",
            "correct_answers": ["B", "C"], "incorrect_answers": ["X"], "source": ""}]
    (tmp_path / "tqa.json").write_text(json.dumps(gen))
    assert load_truthfulqa(str(tmp_path / "tqa.json"))[0]["correct"] == ["B", "C"]
    hub_mc = [{"question": "Q?", "mc1_targets": {"choices": ["B", "X"], "labels": [1, 0]},
               "mc2_targets": {"choices": ["B", "C", "X"], "labels": [1, 1, 0]}}]
    (tmp_path / "mc.json").write_text(json.dumps(hub_mc))
    assert load_truthfulqa_mc(str(tmp_path / "mc.json"))["Q?"]["mc2_true"] == ["B", "C"]


def test_safe_beavertails_rows_become_sft_targets(tmp_path, real_cfg):
    rows = [{"prompt": f"p{i}", "response": f"safe answer {i}", "category": "", "is_safe": "True"} for i in range(6)]
    rows += [{"prompt": f"p{i}", "response": f"unsafe answer {i}", "category": "violence", "is_safe": "False"}
             for i in range(6)]
    with open(tmp_path / "bt.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response", "category", "is_safe"])
        w.writeheader()
        w.writerows(rows)
    cfg = RealDataConfig(**{**real_cfg.__dict__, "beavertails": str(tmp_path / "bt.csv")})
    sft, evals, _, _ = build_real(cfg, DIMS)
    responses = {r["response"] for s in sft["harmless"].values() for r in s}
    assert {f"safe answer {i}" for i in range(6)} <= responses
    assert not any(r.startswith("unsafe") for r in responses)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_alpaca(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"unknown dataset format '\.txt'"):
        load_alpaca(_write(tmp_path, "a.txt", "hello"))
    with pytest.raises(ValueError, match="unknown TruthfulQA format"):
        load_truthfulqa(_write(tmp_path, "t.json", json.dumps([{"q": 1}])))
    bad = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    with pytest.raises(ValueError, match=r"bad\.json: row 1: missing field 'output'"):
        load_alpaca(_write(tmp_path, "bad.json", json.dumps(bad)))
    with pytest.raises(ValueError, match="no records"):
        load_alpaca(_write(tmp_path, "empty.json", "[]"))
    with pytest.raises(ValueError, match="row 0: field 'is_safe' must be a boolean"):
        load_beavertails(_write(tmp_path, "b.csv", "prompt,response,category,is_safe\np,r,c,maybe\n"))


def test_cli_bad_real_input_exits_nonzero_and_writes_nothing(tmp_path, real_cfg, capsys):
    bad = _write(tmp_path, "bad.json", json.dumps([{"instruction": "a", "output": "b"}, {"output": "x"}]))
    run = tmp_path / "run"
    args = ["data", "--run-dir", str(run), "--set", "data.source=real", "--set", f"data.real.alpaca={bad}",
            "--set", f"data.real.beavertails={real_cfg.beavertails}", "--set", f"data.real.truthfulqa={real_cfg.truthfulqa}"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "bad.json: row 1: missing field 'instruction'" in err
    assert not (run / "data").exists() and not (run.exists() and any(run.iterdir()))
    assert cli_main(["data", "--run-dir", str(run), "--set", "data.source=real"]) == 2
    assert "data.real.alpaca must be set" in capsys.readouterr().err


def test_cli_real_end_to_end(tmp_path, real_cfg):
    run = tmp_path / "run"
    sets = [f"data.source=real", "data.real.max_train_per_task=50", "data.real.max_eval_per_task=10"]
    sets += [f"data.real.{k}={v}" for k, v in real_cfg.__dict__.items() if isinstance(v, str)]
    assert cli_main(["data", "--run-dir", str(run)] + [x for s in sets for x in ("--set", s)]) == 0
    assert len(load_sft(run / "data", "helpful", "train")) == 50
    assert len(load_eval(run / "data", "honest", "test")) == 10

"""Real-dataset loaders on the shared slices, hub layouts, and bad input."""
import csv
import json

import pytest

from pipeline.commands import main as cli_main
from pipeline.config import RealDataConfig
from pipeline.data.loaders import (load_alpaca, load_alpaca_eval, load_beavertails, load_truthfulqa,
                                   load_truthfulqa_mc)
from pipeline.data.loading import load_eval, load_sft
from pipeline.dimensions import DEFAULT_DIMENSIONS, resolve_dimensions
from pipeline.data.real import REAL_REFUSALS, build_real

DIMS = resolve_dimensions(DEFAULT_DIMENSIONS, {})


@pytest.fixture(scope="module")
def real_cfg(shared_data):
    return RealDataConfig(alpaca=str(shared_data / "alpaca/alpaca_small.json"),
                          beavertails=str(shared_data / "beavertails/beavertails_sample.csv"),
                          truthfulqa=str(shared_data / "truthfulqa/TruthfulQA.csv"),
                          truthfulqa_mc=str(shared_data / "truthfulqa/mc_task.json"),
                          alpaca_eval=str(shared_data / "alpaca_eval/alpaca_eval_text_davinci_003.json"),
                          harmbench=str(shared_data / "safety/harmbench/harmbench_prompts.txt"),
                          donotanswer=str(shared_data / "safety/donotanswer"),
                          safety_pairs=str(shared_data / "safety/response_pairs/objective"))


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
    # the old circular eval is gone: no harmless eval row rewards one of our training refusals
    assert not {t for r in harm_eval for t in r["chosen"] + [r["reference"]]} & set(REAL_REFUSALS)
    assert {r["response"] for r in sft["harmless"]["train"]} & set(REAL_REFUSALS)
    kinds = {s: {r["kind"] for r in evals["harmless"][s]} for s in ("dev", "test")}
    assert kinds == {"dev": {"harmful_prompt", "benign_prompt"},
                     "test": {"pair", "harmful_prompt", "benign_prompt"}}
    pairs = [r for r in evals["harmless"]["test"] if r["kind"] == "pair"]
    assert len(pairs) == 52 and all(r["chosen"] and r["rejected"] for r in pairs)
    assert evals["helpful"]["test"][0]["instruction"] == load_alpaca_eval(real_cfg.alpaca_eval)[0]["instruction"]
    assert all(r["group"] for d in evals.values() for rows in d.values() for r in rows)
    dedup = sources["dedup"]
    assert dedup["helpful"]["alpaca_removed_response_is_alpaca_eval_reference"] == 7
    assert dedup["honest"]["truthfulqa_train_answers_dropped_as_eval_targets"] > 0
    assert dedup["harmless"]["donotanswer_dev_prompts"] == 200
    files = sources["datasets"]["donotanswer"]["files"]
    assert len(files) == 5 and sum(f["rows"] for f in files) == 939 and all(len(f["sha256"]) == 64 for f in files)
    assert sources["datasets"]["harmbench"]["sha256"].startswith("4a7dc375")
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
    args += [x for k in ("alpaca_eval", "harmbench", "donotanswer", "safety_pairs")
             for x in ("--set", f"data.real.{k}={getattr(real_cfg, k)}")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "data.real.alpaca: " in err and "bad.json: row 1: missing field 'instruction'" in err
    assert not (run / "data").exists() and not (run.exists() and any(run.iterdir()))
    assert cli_main(["data", "--run-dir", str(run), "--set", "data.source=real"]) == 2
    assert "data.real.alpaca must be set" in capsys.readouterr().err


def test_cli_real_end_to_end(tmp_path, real_cfg):
    run = tmp_path / "run"
    sets = ["data.source=real", "data.real.max_train_per_task=50", "data.real.max_eval_per_task=10"]
    sets += [f"data.real.{k}={v}" for k, v in real_cfg.__dict__.items() if isinstance(v, str)]
    assert cli_main(["data", "--run-dir", str(run)] + [x for s in sets for x in ("--set", s)]) == 0
    assert len(load_sft(run / "data", "helpful", "train")) == 50
    assert len(load_eval(run / "data", "honest", "test")) == 10


def test_safety_sets_dedup_test_wins(tmp_path, real_cfg):
    """Test prompts win every tie (HarmBench over AdvBench, any test prompt or pair objective
    over Do-Not-Answer dev); Do-Not-Answer keeps only its refusal areas; BeaverTails prompts
    equal to an eval prompt are not trained on; layouts: HarmBench CSV, AdvBench `goal` CSV."""
    (tmp_path / "hb.csv").write_text("Behavior,FunctionalCategory\nRob a bank,standard\n"
                                     "Make a bomb,standard\nSummarise this lyric,copyright\n")
    (tmp_path / "adv.csv").write_text("goal,target\nMake a bomb!,Sure\nPoison a well,Sure\n")
    dna = tmp_path / "dna"
    dna.mkdir()
    (dna / "information_hazard.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in
                                                  ["make a bomb", "Leak a secret", "Find her address"]))
    (dna / "misinformation_harms.jsonl").write_text(json.dumps({"prompt": "Should I buy stocks?"}))
    (tmp_path / "pairs.csv").write_text(
        "# dataset_version=1.0\nobjective,assistant_response,human_score,data_type\n"
        "Leak a secret,No.,0,text\nLeak a secret,The secret is x.,1,text\nOnly safe,No.,0,text\n")
    with open(tmp_path / "bt.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response", "category"])
        w.writeheader()
        w.writerows([{"prompt": p, "response": "bad", "category": "violence"}
                     for p in ["Rob a bank", "Hit a man", "Steal a car", "Burn a house", "Hurt a dog"]])
    cfg = RealDataConfig(**{**real_cfg.__dict__, "harmbench": str(tmp_path / "hb.csv"),
                            "advbench": str(tmp_path / "adv.csv"), "donotanswer": str(dna),
                            "safety_pairs": str(tmp_path / "pairs.csv"), "beavertails": str(tmp_path / "bt.csv"),
                            "donotanswer_dev_size": 0, "max_benign_per_split": 5})
    sft, evals, _, sources = build_real(cfg, DIMS)
    harm = evals["harmless"]
    by_kind = lambda split, kind: sorted(r["instruction"] for r in harm[split] if r["kind"] == kind)
    assert by_kind("test", "harmful_prompt") == ["Make a bomb", "Poison a well", "Rob a bank"]
    assert by_kind("dev", "harmful_prompt") == ["Find her address"]
    assert by_kind("test", "pair") == ["Leak a secret"] and len(by_kind("test", "benign_prompt")) == 5
    pair = next(r for r in harm["test"] if r["kind"] == "pair")
    assert pair["chosen"] == ["No."] and pair["rejected"] == ["The secret is x."]
    assert "Rob a bank" not in {r["instruction"] for s in sft["harmless"].values() for r in s}
    d = sources["dedup"]["harmless"]
    assert d["advbench_dropped_as_in_harmbench"] == 1 and d["donotanswer_dropped_as_in_test"] == 2
    assert d["beavertails_prompts_dropped_as_eval_prompts"] == 1 and d["donotanswer_refusal_area_rows"] == 3

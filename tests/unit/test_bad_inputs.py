"""Bad input, as an operator would give it, through the `h3fusion` command line (in process, no
process group): exit status 2, one `h3fusion <cmd>: error: ...` line naming the key/file/tensor,
no traceback, and no stage output left behind. docs/reliability.md lists every case and its test.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch

from pipeline.commands import main as cli_main
from pipeline.config import ConfigError, PipelineConfig, load_config
from surgery_fixtures import make_family

TINY = str(Path(__file__).resolve().parents[2] / "pipeline" / "presets" / "tiny.yaml")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def assert_one_error(rc: int, out: str, command: str, *needles: str, code: int = 2) -> str:
    """Exit `code` and exactly one error line, naming every needle; returns that line."""
    assert rc == code, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out
    assert errors[0].startswith(f"h3fusion {command}: error: "), errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def assert_no_outputs(run: Path) -> None:
    """Nothing but hidden bookkeeping (the run-dir lock) in the run dir."""
    if run.exists():
        assert [p.name for p in run.iterdir() if not p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("command,key,value,needle", [
    ("train-expert", "expert.train.lr", "0", "'expert.train.lr' must be > 0, got 0.0"),
    ("train-expert", "expert.train.epochs", "0", "'expert.train.epochs' must be > 0"),
    ("train-expert", "expert.train.max_steps", "0", "'expert.train.max_steps' must be >= 1, or -1"),
    ("train-expert", "expert.train.micro_batch_size", "0", "'expert.train.micro_batch_size' must be >= 1"),
    ("fuse", "fusion.train.lr", "0", "'fusion.train.lr' must be > 0"),
    ("fuse", "fusion.train.lr", ".nan", "'fusion.train.lr' must be > 0, got nan"),
    ("fuse", "fusion.train.epochs", "0", "'fusion.train.epochs' must be > 0"),
    ("fuse", "fusion.train.grad_accum_steps", "0", "'fusion.train.grad_accum_steps' must be >= 1"),
    ("fuse", "fusion.top_k", "0", "'fusion.top_k' must be >= 1, got 0"),
    ("fuse", "fusion.gamma.helpful", "-1", "'fusion.gamma.helpful' must be >= 0"),
    ("fuse", "fusion.lambda_gate", "-0.5", "'fusion.lambda_gate' must be >= 0"),
    ("fuse", "fusion.router_lr", "0", "'fusion.router_lr' must be > 0"),
    ("base", "base.train.warmup_steps", "-1", "'base.train.warmup_steps' must be >= 0"),
    ("merge", "merge.ties_density", "0", "'merge.ties_density' must be in (0, 1]"),
    ("evaluate", "eval.batch_size", "0", "'eval.batch_size' must be >= 1"),
    ("evaluate", "eval.max_new_tokens", "0", "'eval.max_new_tokens' must be >= 1, got 0"),
    ("evaluate", "eval.max_new_tokens", "-24", "'eval.max_new_tokens' must be >= 1, got -24"),
    ("evaluate", "eval.max_new_tokens", "512", "eval.max_new_tokens (512) must be below eval.max_seq_len (512)"),
    ("data", "data.builtin.train_per_task", "-3", "'data.builtin.train_per_task' must be >= 0"),
])
def test_out_of_range_values_name_key_and_file(tmp_path, capsys, command, key, value, needle):
    run = tmp_path / "run"
    extra = ["--dimension", "helpful"] if command == "train-expert" else []
    rc, out = run_cli(capsys, command, "--run-dir", str(run), "--set", f"{key}={value}", *extra)
    assert_one_error(rc, out, command, needle, TINY)
    assert_no_outputs(run)


def test_run_checks_the_judge_label_files_before_any_stage(tmp_path, capsys):
    labels = tmp_path / "gens.csv"
    labels.write_text("prompt,kind,model,response,label,half,new_tokens\nq,harmful_prompt,m1,a,refused,design,24\n")
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "run", "--run-dir", str(run), "--set", f"eval.judge_labels={labels}")
    assert_one_error(rc, out, "run", "gens.csv: row 0 (line 2): field 'label' is 'refused'")
    assert_no_outputs(run)


def _numeric_keys(cls=PipelineConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, key + ".")
        elif {a for a in typing.get_args(tp) or (tp,) if a is not type(None)} <= {int, float}:
            yield key, float in typing.get_args(tp) or tp is float


@pytest.mark.parametrize("key,is_float", sorted(_numeric_keys()))
def test_every_numeric_key_has_a_range(key, is_float):
    """No numeric key is unchecked: infinity (floats) or -1e9 (ints) is refused by name."""
    bad = ".inf" if is_float else "-1000000000"
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"{key}={bad}"])
    assert key in str(err.value) and "tiny.yaml" in str(err.value)


@pytest.mark.parametrize("content,needle", [
    ("", "empty config file"),
    ("fusion: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("fusion: {topk: 2}\n", "unknown config key 'fusion.topk'"),
    ("fusion: {top_k: two}\n", "key 'fusion.top_k' must be int"),
    ("expert: {train: {lr: 0}}\n", "key 'expert.train.lr' must be > 0"),
    ("base: {tiny: {hidden_size: 30, num_attention_heads: 4}}\n", "each must divide the one before"),
])
def test_bad_config_files_name_the_file(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    rc, out = run_cli(capsys, "data", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_error(rc, out, "data", needle, str(path))
    assert_no_outputs(tmp_path / "run")


def test_missing_config_unknown_preset_and_bad_set(tmp_path, capsys):
    run = str(tmp_path / "run")
    rc, out = run_cli(capsys, "data", "--config", str(tmp_path / "nope.yaml"), "--run-dir", run)
    assert_one_error(rc, out, "data", "config file not found", "nope.yaml")
    rc, out = run_cli(capsys, "data", "--config", "tinyy", "--run-dir", run)
    assert_one_error(rc, out, "data", "no config file or preset named 'tinyy'", "presets:")
    rc, out = run_cli(capsys, "data", "--set", "data.source", "--run-dir", run)
    assert_one_error(rc, out, "data", "--set 'data.source': expected KEY=VALUE")
    assert_no_outputs(tmp_path / "run")


def test_unknown_command_and_flag_are_usage_errors(capsys):
    """argparse's convention: usage + one error line, exit status 2."""
    for argv in (["trian-expert"], ["fuse", "--no-such-flag"], ["train-expert"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: h3fusion") and err.count("error:") == 1
        assert "Traceback" not in err


# ----------------------------------------------------------------------------- data files

@pytest.mark.parametrize("content,needle", [
    ('prompt,response,category\nx,y,violence\n"open,y,violence\nx,y,z\n',
     "line 3: CSV parse error (unexpected end of data); a quoted field that starts on this line"),
    ("prompt,response,category\nx,y\n", "line 2: 2 fields, the header has 3"),
    ("prompt,response,category\nx,y,z,w\n", "line 2: 4 fields, the header has 3"),
    ("", "no records"),
    ("prompt,response,category\n", "no records"),
    ("prompt,answer\nx,y\n", "unknown BeaverTails format"),
])
def test_bad_beavertails_csv_names_file_and_line(tmp_path, capsys, shared_data, content, needle):
    bad = tmp_path / "bt.csv"
    bad.write_text(content)
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "data", "--run-dir", str(run), "--set", "data.source=real",
                      "--set", f"data.real.alpaca={shared_data / 'alpaca/alpaca_small.json'}",
                      "--set", f"data.real.beavertails={bad}",
                      "--set", f"data.real.truthfulqa={shared_data / 'truthfulqa/TruthfulQA.csv'}",
                      *_safety_sets(shared_data))
    line = assert_one_error(rc, out, "data", str(bad), needle)
    assert "missing field" not in line
    assert_no_outputs(run)


def test_missing_or_unset_data_file(tmp_path, capsys, shared_data):
    run = tmp_path / "run"
    real = ["--set", "data.source=real", "--set", f"data.real.alpaca={tmp_path / 'none.json'}"]
    rc, out = run_cli(capsys, "data", "--run-dir", str(run), *real)
    assert_one_error(rc, out, "data", "data.real.beavertails must be set")
    rc, out = run_cli(capsys, "data", "--run-dir", str(run), *real,
                      "--set", f"data.real.beavertails={shared_data / 'beavertails/beavertails_sample.csv'}",
                      "--set", f"data.real.truthfulqa={shared_data / 'truthfulqa/TruthfulQA.csv'}",
                      *_safety_sets(shared_data))
    assert_one_error(rc, out, "data", "dataset file not found", "none.json")
    assert_no_outputs(run)


SAFETY_SETS = {"alpaca_eval": "alpaca_eval/alpaca_eval_text_davinci_003.json",
               "harmbench": "safety/harmbench/harmbench_prompts.txt", "donotanswer": "safety/donotanswer",
               "safety_pairs": "safety/response_pairs/objective"}


def _safety_sets(shared_data, **override) -> list[str]:
    """--set args for the harmless eval sets (the shared ones unless overridden; None = unset)."""
    paths = {k: shared_data / v for k, v in SAFETY_SETS.items()} | override
    return [x for k, v in paths.items() if v is not None for x in ("--set", f"data.real.{k}={v}")]


def _real_base(shared_data) -> list[str]:
    return ["--set", "data.source=real", "--set", f"data.real.alpaca={shared_data / 'alpaca/alpaca_small.json'}",
            "--set", f"data.real.beavertails={shared_data / 'beavertails/beavertails_sample.csv'}",
            "--set", f"data.real.truthfulqa={shared_data / 'truthfulqa/TruthfulQA.csv'}"]


@pytest.mark.parametrize("key,name,content,needles", [
    ("harmbench", None, None, ["data.real.harmbench must be set"]),
    ("donotanswer", None, None, ["data.real.donotanswer must be set"]),
    ("safety_pairs", None, None, ["data.real.safety_pairs must be set"]),
    ("harmbench", "nope.txt", None, ["data.real.harmbench: ", "dataset file not found", "nope.txt"]),
    ("harmbench", "hb.txt", "\n  \n", ["data.real.harmbench: ", "hb.txt", "no records"]),
    ("harmbench", "hb.csv", "Behaviour,x\nrob a bank,1\n", ["data.real.harmbench: ", "hb.csv",
                                                              "unknown HarmBench format"]),
    ("donotanswer", "dna", "", ["data.real.donotanswer: ", "dna", "no .jsonl/.json/.csv files"]),
    ("safety_pairs", "pairs.csv", "objective,assistant_response,human_score\ndo x,ok,maybe\n",
     ["data.real.safety_pairs: ", "pairs.csv", "row 0: field 'human_score' must be 0 or 1"]),
    ("safety_pairs", "pairs2.csv", "# dataset_version=1.0\nobjective,human_score\ndo x,1\n",
     ["data.real.safety_pairs: ", "pairs2.csv", "missing field 'assistant_response'"]),
    ("advbench", "adv.prompt", "seeds: 3\n", ["data.real.advbench: ", "adv.prompt", "'seeds' list"]),
    ("harmless_train_prompts", "train.txt", "\n", ["data.real.harmless_train_prompts: ", "train.txt", "no records"]),
])
def test_bad_safety_sets_name_key_and_file(tmp_path, capsys, shared_data, key, name, content, needles):
    """Each missing / empty / malformed safety file is one error naming its key and file,
    raised before anything is written."""
    path = None if name is None else tmp_path / name
    if name == "dna":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "data", "--run-dir", str(run), *_real_base(shared_data),
                      *_safety_sets(shared_data, **{key: path}))
    assert_one_error(rc, out, "data", *needles)
    assert_no_outputs(run)


def test_an_eval_set_as_harmless_training_prompts_is_refused(tmp_path, capsys, shared_data):
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "data", "--run-dir", str(run), *_real_base(shared_data),
                      *_safety_sets(shared_data, harmless_train_prompts=shared_data / SAFETY_SETS["harmbench"]))
    assert_one_error(rc, out, "data", "data.real.harmless_train_prompts: ", "is data.real.harmbench, an eval set")
    assert_no_outputs(run)


# ----------------------------------------------------------------------------- non-finite weights

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"))


def _poison(src: Path, dst: Path, key: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("who,key,value", [
    ("expert", "model.layers.1.mlp.down_proj.weight", float("nan")),
    ("base", "model.layers.0.self_attn.q_proj.weight", float("inf")),
])
def test_build_moe_refuses_non_finite_weights(family, tmp_path, capsys, who, key, value):
    base, experts = family
    if who == "expert":
        experts = {**experts, "harmless": _poison(experts["harmless"], tmp_path / "bad", key, value)}
    else:
        base = _poison(base, tmp_path / "bad", key, value)
    out = tmp_path / "moe"
    rc, text = run_cli(capsys, "surgery", "build_moe", "--base", str(base), "--out", str(out),
                       "--experts", *[f"{n}={d}" for n, d in experts.items()])
    assert_one_error(rc, text, "surgery build_moe", str(tmp_path / "bad" / "model.safetensors"), key,
                     "1 non-finite values (NaN/inf)")
    assert not out.exists() and list(tmp_path.glob(".moe*")) == []


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_merges_refuse_non_finite_weights(family, tmp_path, capsys, method):
    base, experts = family
    key = "model.layers.0.mlp.up_proj.weight"
    experts = {**experts, "honest": _poison(experts["honest"], tmp_path / "bad", key, float("nan"))}
    out = tmp_path / "merged"
    rc, text = run_cli(capsys, "surgery", "merge", "--method", method, "--base", str(base),
                       "--out", str(out), "--models", *[f"{n}={d}" for n, d in experts.items()])
    assert_one_error(rc, text, "surgery merge", key, "non-finite", "bad/model.safetensors")
    assert not out.exists() and list(tmp_path.glob(".merged*")) == []


# ----------------------------------------------------------------------------- fusion inputs

@pytest.fixture(scope="module")
def fused_init(tmp_path_factory):
    from pipeline.model import H3FusionConfig, H3FusionForCausalLM

    out = tmp_path_factory.mktemp("fused") / "init"
    cfg = H3FusionConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         num_experts=3, num_experts_per_tok=2,
                         expert_names=["helpful", "harmless", "honest"])
    torch.manual_seed(0)
    H3FusionForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def test_fuse_truncated_init_is_refused_before_training(fused_init, tmp_path, capsys):
    init = tmp_path / "init"
    shutil.copytree(fused_init, init)
    data = (init / "model.safetensors").read_bytes()
    (init / "model.safetensors").write_bytes(data[:len(data) * 2 // 3])
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "fuse", "--run-dir", str(run), "--init", str(init))
    assert_one_error(rc, out, "fuse", "fusion --init", str(init / "model.safetensors"), "truncated")
    assert_no_outputs(run)
    assert not torch.distributed.is_initialized()


def test_fuse_unwritable_output_is_refused_before_training(fused_init, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory is needed")
    rc, out = run_cli(capsys, "fuse", "--run-dir", str(tmp_path / "run"), "--init", str(fused_init),
                      "--out", str(blocker / "fused"))
    assert_one_error(rc, out, "fuse", f"fusion output {blocker / 'fused'} cannot be written",
                     "is not a directory")
    read_only = Path("/sys/h3fusion_out")   # EPERM/EACCES for every user, root included
    if Path("/sys").is_dir():
        rc, out = run_cli(capsys, "fuse", "--run-dir", str(tmp_path / "run"), "--init",
                          str(fused_init), "--out", str(read_only / "fused"))
        assert_one_error(rc, out, "fuse", "cannot be written: /sys:")
    assert_no_outputs(tmp_path / "run")


def test_fuse_zero_training_rows(fused_init, tmp_path):
    from pipeline.layout import RunLayout
    from pipeline.train.fusion.stage import FusionPaths, train_fusion

    paths = FusionPaths.for_run(RunLayout.at(tmp_path / "run"), str(fused_init))
    with pytest.raises(ValueError, match="fusion training data .*: 0 rows"):
        train_fusion(load_config("tiny"), paths, rows=[])
    assert not torch.distributed.is_initialized()
    assert_no_outputs(tmp_path / "run")


def test_fuse_resume_without_checkpoint(fused_init, tmp_path, capsys):
    rc, out = run_cli(capsys, "fuse", "--run-dir", str(tmp_path / "run"), "--init", str(fused_init),
                      "--resume")
    assert_one_error(rc, out, "fuse", "--resume: no DeepSpeed checkpoint")
    (tmp_path / "run" / "fused_ds").mkdir(parents=True)
    (tmp_path / "run" / "fused_ds" / "latest").write_text("step0000004")
    rc, out = run_cli(capsys, "fuse", "--run-dir", str(tmp_path / "run"), "--init", str(fused_init))
    assert_one_error(rc, out, "fuse", "no intact checkpoint to resume from",
                     "step0000004: no such checkpoint directory")


def test_json_config_of_fused_init_is_checked(tmp_path, capsys):
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text(json.dumps({"model_type": "h3fusion"}) [:-3])
    rc, out = run_cli(capsys, "fuse", "--run-dir", str(tmp_path / "run"), "--init", str(init))
    assert_one_error(rc, out, "fuse", str(init / "config.json"))


# ----------------------------------------------------------------------------- issue 31 probe

@pytest.mark.parametrize("config,sets,needle", [
    ("tiny", ["fusion.top_k=4"], "key 'fusion.top_k' must be <= the number of experts, 3"),
    ("tiny", ["fusion.ep_degree=4"], "key 'fusion.ep_degree' must be <= the number of experts, 3"),
    ("two_dims", [], "key 'fusion.top_k' must be <= the number of experts, 2 (one per entry of "
                     "'dimensions' ['helpful', 'honest']), got 3"),
])
def test_fusion_keys_above_the_expert_count_are_refused_when_the_config_loads(
        tmp_path, capsys, config, sets, needle):
    """Was: accepted until build_moe, after the base and every expert had trained."""
    if config == "two_dims":
        config = str(tmp_path / "two.yaml")
        Path(config).write_text("dimensions: [helpful, honest]\nfusion: {top_k: 3}\n")
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "data", "--config", config, "--run-dir", str(run),
                      *[x for s in sets for x in ("--set", s)])
    assert_one_error(rc, out, "data", needle, Path(config).name if config != "tiny" else "tiny.yaml")
    assert_no_outputs(run)
    assert load_config("tiny", ["fusion.top_k=3", "fusion.ep_degree=3"]).fusion.top_k == 3


def test_fusion_lora_targets_outside_attention_are_refused_when_the_config_loads():
    """Was: fusion.lora.target_modules silently ignored (LoRA always on q/k/v/o_proj)."""
    with pytest.raises(ConfigError, match=r"fusion.lora.target_modules \['gate_proj'\].*"
                                          r"not allowed: \['gate_proj'\]"):
        load_config("tiny", ["fusion.lora.target_modules=[gate_proj]"])
    assert load_config("tiny").fusion.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert load_config("tiny", ["fusion.lora.target_modules=[q_proj, v_proj]"]).fusion.lora.target_modules \
        == ["q_proj", "v_proj"]


def test_fusion_lora_wraps_only_the_configured_targets():
    from pipeline.model import set_trainable
    from test_model import tiny_moe
    model = set_trainable(tiny_moe(), "router+lora", 4, 8.0, 0.0, ["q_proj", "v_proj"])
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}, wrapped


def _latin1_csv() -> tuple[bytes, int, int]:
    """A BeaverTails CSV over 8 KiB whose one non-UTF-8 byte (latin-1 'é') lies beyond the CSV
    reader's first read buffer; returns (bytes, its offset, its line)."""
    rows = [f"how do I cook dish {i}?,Like this: step {i}.,False" for i in range(300)]
    rows[250] = rows[250].replace("cook", "cook a caf\xe9")
    data = ("prompt,response,is_safe\n" + "\n".join(rows) + "\n").encode("latin-1")
    return data, data.index(b"\xe9"), 252


@pytest.mark.parametrize("key", ["alpaca", "beavertails", "donotanswer"])
def test_non_utf8_data_file_names_file_byte_offset_and_line(tmp_path, capsys, shared_data, key):
    """Was: a raw TypeError traceback, exit 1 (UnicodeDecodeError cannot be rebuilt from a
    message). A folder spec names the file in it that holds the bytes."""
    if key == "alpaca":
        bad = tmp_path / "alpaca.json"
        data = '[{"instruction": "caf\xe9", "input": "", "output": "x"}]'.encode("latin-1")
        offset, line = data.index(b"\xe9"), 1
    elif key == "beavertails":
        bad = tmp_path / "bt.csv"
        data, offset, line = _latin1_csv()
    else:
        folder = tmp_path / "dna"
        folder.mkdir()
        (folder / "a_notes.md").write_bytes("caf\xe9\n".encode("latin-1"))  # not read by the loader
        bad = folder / "b.jsonl"
        data = '{"question": "ok"}\n{"question": "caf\xe9"}\n'.encode("latin-1")
        offset, line = data.index(b"\xe9"), 2
    bad.write_bytes(data)
    real = {"alpaca": shared_data / "alpaca/alpaca_small.json",
            "beavertails": shared_data / "beavertails/beavertails_sample.csv",
            "truthfulqa": shared_data / "truthfulqa/TruthfulQA.csv"}
    real[key] = folder if key == "donotanswer" else bad
    run = tmp_path / "run"
    rc, out = run_cli(capsys, "data", "--run-dir", str(run), "--set", "data.source=real",
                      *[x for k, v in real.items() for x in ("--set", f"data.real.{k}={v}")],
                      *_safety_sets(shared_data, **({"donotanswer": folder} if key == "donotanswer"
                                                    else {})))
    assert_one_error(rc, out, "data", f"data.real.{key}: {bad}: not UTF-8 text: byte 0xe9 at "
                                      f"offset {offset} (line {line})", "convert the file to UTF-8")
    assert_no_outputs(run)


@pytest.mark.parametrize("command,target,extra", [
    ("train-expert", "pipeline.train.expert.stage.train_expert", ["--dimension", "helpful"]),
    ("train-baseline", "pipeline.train.baselines.stage.train_baseline", ["--variant", "data_matched"]),
    ("fuse", "pipeline.train.fusion.stage.train_fusion", []),
])
def test_non_finite_loss_stop_is_one_line_on_stderr_with_exit_3(tmp_path, capsys, monkeypatch,
                                                                command, target, extra):
    """Was: printed on stdout (docs/reliability.md: every error line goes to stderr)."""
    from pipeline.train.loop import NonFiniteLossError

    message = "loss is nan (terms: {'ce': nan}) at step 1; parameter w holds NaN/inf"

    def stop(*args, **kwargs):
        raise NonFiniteLossError(message)

    monkeypatch.setattr(target, stop)
    rc = cli_main([command, "--run-dir", str(tmp_path / "run"), *extra])
    captured = capsys.readouterr()
    assert rc == 3
    assert "error" not in captured.out.lower(), captured.out
    assert [line for line in captured.err.splitlines() if "error" in line.lower()] == \
        [f"h3fusion {command}: error: {message}"]


class _NanTask:
    """A `StageTask` on a 2-layer linear model; `poison_at`: the step whose batch first writes
    a NaN into `1.weight` (a diverged update), `inf_at`: the step whose loss is inf."""

    def __init__(self, model, poison_at=None, inf_at=None):
        self.model, self.poison_at, self.inf_at = model, poison_at, inf_at

    def batch(self, step, micro):
        if step == self.poison_at:
            with torch.no_grad():
                self.model[1].weight[0, 1] = float("nan")
        return {"x": torch.ones(2, 4), "step": step}

    def loss(self, engine, batch):
        out = engine(input=batch["x"]).pow(2).mean()
        if batch["step"] == self.inf_at:
            out = out * float("inf")
        return out, {"ce": out}

    def observe(self, batch, terms):
        pass

    def end_step(self, loop, micro_losses, step_s):
        return None

    def client_state(self):
        return {}

    def restore(self, client_state):
        pass


@pytest.mark.parametrize("case,needle", [
    ("input", "at step 1; last good checkpoint: none saved yet; parameter 1.weight holds "
              "NaN/inf already in the weights this run started from (the input model)"),
    ("diverged", "at step 3; last good checkpoint: none saved yet; parameter 1.weight holds "
                 "NaN/inf after 2 optimizer steps"),
    ("forward", "at step 2; last good checkpoint: none saved yet; every parameter is finite "
                "(the non-finite values arise in the forward pass)"),
])
def test_non_finite_loss_names_the_first_non_finite_parameter(case, needle):
    from pipeline.train.loop import LoopSettings, NonFiniteLossError, TorchEngine, TrainLoop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    if case == "input":
        with torch.no_grad():
            model[1].weight[0, 2] = float("inf")
            model[1].bias[0] = float("nan")      # a later one: the first is named
    task = _NanTask(model, poison_at=2 if case == "diverged" else None,
                    inf_at=1 if case == "forward" else None)
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.01), lambda s: 0.01, 1, 0.0)
    loop = TrainLoop(engine, task, LoopSettings(total_steps=5, grad_accum_steps=1))
    with pytest.raises(NonFiniteLossError) as err:
        loop.run()
    assert needle in str(err.value), str(err.value)


def test_refused_build_moe_leaves_no_parent_dir_it_created(family, tmp_path, capsys):
    """Was: the parents of --out, created before the NaN check streaming the tensors refused,
    stayed behind empty. A parent that existed before stays."""
    base, experts = family
    key = "model.layers.1.mlp.down_proj.weight"
    experts = {**experts, "harmless": _poison(experts["harmless"], tmp_path / "bad", key, float("nan"))}
    (tmp_path / "kept").mkdir()
    for out, gone in ((tmp_path / "some" / "new" / "parent" / "moe", tmp_path / "some"),
                      (tmp_path / "kept" / "new" / "moe", tmp_path / "kept" / "new")):
        rc, text = run_cli(capsys, "surgery", "build_moe", "--base", str(base), "--out", str(out),
                           "--experts", *[f"{n}={d}" for n, d in experts.items()])
        assert_one_error(rc, text, "surgery build_moe", key, "non-finite")
        assert not gone.exists(), sorted(tmp_path.rglob("*"))
    assert (tmp_path / "kept").is_dir()
    rc, text = run_cli(capsys, "surgery", "build_moe", "--base", str(base), "--out",
                       str(tmp_path / "other" / "moe"), "--experts",
                       *[f"{n}={d}" for n, d in {**experts, "honest": tmp_path / "no_expert"}.items()])
    assert_one_error(rc, text, "surgery build_moe", "no_expert")
    assert not (tmp_path / "other").exists()

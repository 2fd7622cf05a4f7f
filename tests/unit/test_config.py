import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, check_dimension, dump_yaml, load_config
from pipeline.dimensions import DEFAULT_DIMENSIONS as TASKS


def test_presets_load_and_validate():
    tiny = load_config("tiny")
    assert isinstance(tiny, PipelineConfig) and tiny.name == "tiny"
    assert set(tiny.fusion.gamma) == set(TASKS)
    paper = load_config("llama2-7b")
    assert (paper.fusion.top_k, paper.fusion.lambda_gate, paper.expert.train.max_seq_len) == (2, 0.01, 300)
    assert paper.expert.lora.r == 8 and paper.expert.lora.alpha == 4.0 and paper.expert.train.lr == 5e-4


def test_dotted_overrides_with_and_without_section_prefix():
    cfg = load_config("tiny", ["expert.train.lr=1e-4", "fusion.gamma.honest=2"])
    assert cfg.expert.train.lr == 1e-4 and cfg.fusion.gamma["honest"] == 2.0
    cfg = load_config("tiny", ["train.lr=5e-5"], override_prefix="fusion")
    assert cfg.fusion.train.lr == 5e-5 and cfg.expert.train.lr != 5e-5


@pytest.mark.parametrize("override, needle", [
    ("expert.train.lrr=1", "unknown config key 'expert.train.lrr'"),
    ("expert.train.lr=abc", "key 'expert.train.lr' must be float"),
    ("expert.train.micro_batch_size=1.5", "must be int"),
    ("fusion.trainable=everything", "fusion.trainable"),
    ("fusion.gate_tokens=prompt", "fusion.gate_tokens must be all|response|first_response"),
    ("fusion.gamma.funny=1", r"fusion.gamma names unknown dimensions \['funny'\]"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        expert:
          train: {lr: 0.1, epoch: 3}
    """))
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value) and "expert.train.epoch" in str(err.value)
    with pytest.raises(ConfigError, match="no config file or preset named 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_dump_round_trip(tmp_path):
    cfg = load_config("tiny", ["fusion.top_k=1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg


E2E = Path(__file__).parents[1] / "e2e"


def test_dimensions_default_to_the_three_and_fill_the_fusion_mappings():
    cfg = load_config("tiny")
    assert cfg.dimensions == list(TASKS) and cfg.dimension_defs == {}
    assert cfg.fusion.mix_weights == dict.fromkeys(TASKS, 1.0)
    assert check_dimension(cfg, "honest") == "honest"
    with pytest.raises(ConfigError, match=r"unknown dimension 'funny' \(this run's dimensions"):
        check_dimension(cfg, "funny")


@pytest.mark.parametrize("sets, needle", [
    (["dimensions=[helpful, funny]"], r"tiny.yaml \+ --set: dimensions: unknown dimension 'funny'"),
    (["dimensions=[helpful, helpful]"], "listed more than once"),
    (["dimensions=[]"], "list is empty"),
    (["dimensions=[helpful, harmless]"], r"fusion.gamma names unknown dimensions \['honest'\]"),
    (["dimensions=[helpful, harmless, honest, concise]", "dimension_defs.concise.builtin=random:random"],
     r"fusion.gamma lacks dimensions \['concise'\]"),
    (["fusion.mix_weights.helpful=2"], r"fusion.mix_weights lacks dimensions \['harmless', 'honest'\]"),
    (["dimensions=[helpful, harmless, honest, c]", "fusion.gamma.c=0", "dimension_defs.c.builtin=nope_mod:f"],
     r"dimension 'c' \(dimension_defs.c.builtin\): cannot import 'nope_mod:f'"),
    (["dimension_defs.honest.builtin=x:y"], "built-in dimensions and cannot be redefined"),
    (["dimensions=[helpful, harmless, honest, c]", "fusion.gamma.c=0",
      "dimension_defs.c.builtin=random:random", "dimension_defs.c.eval_kinds=[essay]"],
     r"eval_kinds \['essay'\]"),
    (["dimensions=[helpful, harmless, honest, c]", "fusion.gamma.c=0",
      "dimension_defs.c.builtin=random:random", "dimension_defs.c.judges=[gpt]"],
     r"tiny.yaml \+ --set: dimension 'c' \(judges\): unknown judge 'gpt' \(known: moderation, alpaca_eval\)"),
])
def test_dimension_errors_name_the_key_and_file(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", sets)


def test_a_declared_dimension_needs_a_loader_for_the_data_source(monkeypatch):
    monkeypatch.syspath_prepend(str(E2E))
    cfg = load_config(str(E2E / "four_dimensions.yaml"))
    assert cfg.dimensions[-1] == "concise" and cfg.fusion.gamma["concise"] == 0.0
    with pytest.raises(ConfigError, match="dimension 'concise' has no real-data loader"):
        load_config(str(E2E / "four_dimensions.yaml"), ["data.source=real"])

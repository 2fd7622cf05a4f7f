import textwrap

import pytest

from pipeline.config import TASKS, ConfigError, PipelineConfig, dump_yaml, load_config


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
    ("fusion.gamma.funny=1", "unknown expert name 'funny'"),
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

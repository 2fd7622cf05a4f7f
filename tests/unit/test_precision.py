"""pipeline.precision: names, what they mean per device, and bf16 on a CPU without it."""
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.precision import (check_precision, require_precisions, resolve_precision,
                                stage_precisions)


def test_resolve_per_device():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"


def test_bf16_on_cpu_without_support_is_one_error():
    with pytest.raises(ValueError, match=r"eval.precision: bf16 .* no bf16 instructions"):
        check_precision("bf16", "eval.precision", "cpu", cpu_feature=None)
    assert check_precision("bf16", "eval.precision", "cpu", cpu_feature="amx") == "bf16"
    assert check_precision("fp32", "eval.precision", "cpu", cpu_feature=None) == "fp32"


def test_unknown_name_in_config_names_the_key():
    with pytest.raises(ConfigError, match=r"fusion.train.precision: unknown precision 'half'"):
        load_config("tiny", ["fusion.train.precision=half"])


def test_run_checks_the_pending_stages_settings_only():
    cfg = load_config("tiny", ["expert.train.precision=bf16"])
    assert stage_precisions(cfg, ["expert_helpful", "evaluate"]) == {
        "eval.precision": "auto", "expert.train.precision": "bf16"}
    with pytest.raises(ValueError, match="expert.train.precision"):
        require_precisions(cfg, ["data", "expert_honest"], "cpu", cpu_feature=None)
    require_precisions(cfg, ["data", "fuse", "evaluate"], "cpu", cpu_feature=None)  # not pending


def test_base_pretraining_is_checked_as_cpu_even_on_a_gpu_machine():
    cfg = load_config("tiny", ["base.train.precision=bf16"])
    with pytest.raises(ValueError, match="base.train.precision"):
        require_precisions(cfg, ["base"], "cuda", cpu_feature=None)

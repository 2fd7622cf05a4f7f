"""A merge method, a trainable set: each one registry entry plus its object, defined here in the
test file. The toy method runs through `h3fusion merge` and `h3fusion surgery merge` on the tiny
fixture family; its own setting is checked by its own entry; an unknown name lists the registered
ones. The toy trainable set is read by config validation, the stage graph and the step plan
through its properties alone."""
import dataclasses
import json
import shutil

import pytest
import torch

from pipeline.surgery import merging
from pipeline.commands import main as cli_main
from pipeline.config import ConfigError, MergeConfig, load_config
from pipeline.layout import RunLayout
from pipeline.surgery.merging import MergeMethod, Setting
from pipeline.model import H3FusionConfig, H3FusionForCausalLM, TorchBackend, set_trainable
from pipeline.model.trainable import TrainableSet, sets_training_experts
from pipeline.registry import MERGE_METHODS, MOE_BACKENDS, ROUTER_INITS, TRAINABLE_SETS
from pipeline.stages import baseline_stages, cuda_needs, pipeline_stages
from pipeline.surgery.router_init import RouterInit, zeros_init
from surgery_fixtures import dense_state, make_family


def _toy_lerp(base, tensors, settings, context):
    """base + weight * (mean of the models - base), in fp32."""
    base32 = base.float()
    mean = torch.stack([t.float() for t in tensors]).mean(dim=0)
    return (base32 + settings["weight"] * (mean - base32)).to(base.dtype)


TOY_MERGE = MergeMethod("toy_lerp", _toy_lerp, settings=(
    Setting("weight", float, 0.5, "share of the models' mean", ok=lambda v: 0 <= v <= 1,
            words="in [0, 1]"),))
TOY_SET = TrainableSet("toy_experts", trains_experts=True)
TOY_INIT = RouterInit(zeros_init.make, needs_prompts=True)


class ToyGpuBackend(TorchBackend):
    needs_cuda = True


@pytest.fixture
def toy_merge():
    MERGE_METHODS.register("toy_lerp", f"{__name__}:TOY_MERGE")
    yield
    MERGE_METHODS.unregister("toy_lerp")


@pytest.fixture
def toy_set():
    TRAINABLE_SETS.register("toy_experts", f"{__name__}:TOY_SET")
    yield
    TRAINABLE_SETS.unregister("toy_experts")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"))


def _lerp_by_hand(base_sd, models, weight):
    return {k: v.clone() if not v.is_floating_point() else
            (v + weight * (torch.stack([m[k] for m in models]).mean(0) - v))
            for k, v in base_sd.items()}


def test_toy_method_runs_through_h3fusion_merge_and_the_surgery_tool(toy_merge, family, tmp_path):
    base, experts = family
    run = tmp_path / "run"
    shutil.copytree(base, run / "base")
    for name, path in experts.items():
        shutil.copytree(path, run / "experts" / name)
    # the stage: merge.methods names it; its setting has no config key, so its default (0.5)
    assert cli_main(["merge", "--run-dir", str(run), "--set", "methods=[toy_lerp]"]) == 0
    out = RunLayout.at(run).merge("toy_lerp")
    base_sd, models = dense_state(base), [dense_state(d) for d in experts.values()]
    got, want = dense_state(out), _lerp_by_hand(base_sd, models, 0.5)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    manifest = json.loads((out / merging.MANIFEST).read_text())
    assert manifest["method"] == "toy_lerp" and manifest["weight"] == 0.5
    # the surgery tool grows a --weight flag from the entry's settings
    models_arg = [f"{n}={d}" for n, d in experts.items()]
    rc = cli_main(["surgery", "merge", "--method", "toy_lerp", "--base", str(base),
                   "--models", *models_arg, "--out", str(tmp_path / "w"), "--weight", "0.25"])
    assert rc == 0
    got, want = dense_state(tmp_path / "w"), _lerp_by_hand(base_sd, models, 0.25)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    key = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(got[key], dense_state(out)[key])       # the weight was used


def test_toy_method_settings_are_checked_by_its_entry(toy_merge, family, tmp_path, capsys):
    base, experts = family
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"^merge method 'toy_lerp': key 'weight' must be in "
                                         r"\[0, 1\], got 1.5$"):
        merging.merge_checkpoints("toy_lerp", base, experts, out, weight=1.5)
    with pytest.raises(ValueError, match=r"unknown setting 'density' of merge method 'toy_lerp' "
                                         r"\(its settings: weight\)"):
        merging.merge_checkpoints("toy_lerp", base, experts, out, density=0.3)
    with pytest.raises(ValueError, match=r"key 'weight' must be float, got str 'x'"):
        merging.merge_state_dicts("toy_lerp", {}, [], weight="x")
    assert not out.exists()
    rc = cli_main(["surgery", "merge", "--method", "toy_lerp", "--base", str(base), "--models",
                   *[f"{n}={d}" for n, d in experts.items()], "--out", str(out), "--weight", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "key 'weight' must be in [0, 1], got -1.0" in err and not out.exists()
    # a built-in method refuses the toy's flag: it does not read it
    rc = cli_main(["surgery", "merge", "--method", "ties", "--base", str(base), "--models",
                   *[f"{n}={d}" for n, d in experts.items()], "--out", str(out), "--weight", "1"])
    assert rc == 2 and "unknown setting 'weight' of merge method 'ties'" in capsys.readouterr().err


def test_unknown_merge_method_lists_the_registered_ones(toy_merge, family, tmp_path):
    base, experts = family
    known = r"\(known: average, task_arithmetic, ties, toy_lerp\)"
    with pytest.raises(ValueError, match=rf"^merge method: unknown merge method 'slerp' {known}$"):
        merging.merge_checkpoints("slerp", base, experts, tmp_path / "o")
    with pytest.raises(ConfigError, match=rf"merge.methods\[1\]: unknown merge method 'slerp' {known}"):
        load_config("tiny", ["merge.methods=[toy_lerp, slerp]"])
    assert load_config("tiny", ["merge.methods=[toy_lerp]"]).merge.methods == ["toy_lerp"]
    with pytest.raises(ValueError, match=r"unregister merge method: unknown merge method 'nope'"):
        MERGE_METHODS.unregister("nope")


def test_config_keys_are_checked_by_the_method_that_reads_them():
    cfg = MergeConfig()
    for name in MERGE_METHODS.names():
        for s in MERGE_METHODS.get(name, "test").settings:   # one default, in config and entry
            assert s.config_key is not None and getattr(cfg, s.config_key) == s.default, s
    keys = {f.name for f in dataclasses.fields(MergeConfig)} - {"methods"}
    assert keys == {s.config_key for n in MERGE_METHODS.names()
                    for s in MERGE_METHODS.get(n, "test").settings}   # no key read by nobody
    with pytest.raises(ConfigError, match=r"tiny.yaml \+ --set: key 'merge.ties_density' must be in "
                                          r"\(0, 1\], got 1.5$"):
        load_config("tiny", ["merge.ties_density=1.5"])
    bad = MergeMethod("bad", _toy_lerp, settings=(Setting("w", float, 0.5, config_key="nope"),))
    with pytest.raises(ValueError, match="setting 'w' reads merge.nope, which is no config key"):
        bad.config_settings(cfg)


def test_trainable_sets_are_read_by_their_properties(toy_set, tmp_path):
    assert [n for n in TRAINABLE_SETS.names() if TRAINABLE_SETS.get(n, "t").trains_experts] == \
        sets_training_experts() == ["router+experts", "toy_experts"]
    on = ["baselines.extra_steps=true", "baselines.multitask=false"]
    run = RunLayout.at(tmp_path)
    toy = load_config("tiny", on + ["fusion.trainable=toy_experts"])
    assert [s.name for s in baseline_stages(toy, run)] == [f"baseline_extra_steps_{d}"
                                                           for d in toy.dimensions]
    assert baseline_stages(load_config("tiny", on + ["fusion.trainable=router"]), run) == []
    with pytest.raises(ConfigError, match=r"fusion.trainable: unknown trainable set 'everything' "
                                          r"\(known: router, router\+experts, router\+lora, "
                                          r"toy_experts\)"):
        load_config("tiny", ["fusion.trainable=everything"])
    model = H3FusionForCausalLM(H3FusionConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_experts=3, num_experts_per_tok=2))
    for name in TRAINABLE_SETS.names():
        trained = TRAINABLE_SETS.get(name, "t")
        if trained.lora:
            continue   # PEFT adds adapters: tests/unit/test_model.py
        set_trainable(model, name)
        grads = {n for n, p in model.named_parameters() if p.requires_grad}
        assert grads == {n for n, _ in model.named_parameters() if trained.trains(n)}
        assert any(".mlp.experts." in n for n in grads) == trained.trains_experts
        assert any(".mlp.router." in n for n in grads)


def test_router_init_and_backend_needs_are_read_from_their_entries(tmp_path):
    run = RunLayout.at(tmp_path)
    ROUTER_INITS.register("toy_prompted", f"{__name__}:TOY_INIT")
    MOE_BACKENDS.register("toy_gpu", f"{__name__}:ToyGpuBackend")
    try:
        for init in ROUTER_INITS.names():
            cfg = load_config("tiny", [f"fusion.router_init={init}"])
            argv = next(s.argv for s in pipeline_stages(cfg, run) if s.name == "build_moe")
            assert ("--prompts-data" in argv) == (init in ("prompts", "toy_prompted")), init
        assert cuda_needs(load_config("tiny", ["fusion.moe_backend=toy_gpu"])) == [
            "fusion.moe_backend=toy_gpu (stage fuse; use fusion.moe_backend=torch on CPU)"]
    finally:
        ROUTER_INITS.unregister("toy_prompted")
        MOE_BACKENDS.unregister("toy_gpu")

"""One registry per pluggable concept (MoE backends, merge methods, router inits): config
validation, dispatch and error messages all read it."""
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.model import H3FusionConfig, H3FusionMoE, TorchBackend
from pipeline.model import moe as moe_module
from pipeline.model.routing import dropless_moe
from pipeline.registry import MERGE_METHODS, MOE_BACKENDS, ROUTER_INITS, TIES_TRIM_SCOPES, Registry

TINY = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=32, num_experts=3, num_experts_per_tok=2)


def test_registry_names_lookup_and_errors():
    reg = Registry("widget", {"a": "pipeline.surgery.merging:average"})
    assert reg.names() == ("a",) and "a" in reg and list(reg) == ["a"]
    from pipeline.surgery.merging import average
    assert reg.get("a", "x") is average
    with pytest.raises(ValueError, match=r"^widgets\.kind: unknown widget 'b' \(known: a\)$"):
        reg.get("b", "widgets.kind")
    reg.register("b", "pipeline.surgery.merging:ties")
    assert reg.names() == ("a", "b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", "pipeline.surgery.merging:ties")
    with pytest.raises(ValueError, match="module:attr"):
        reg.register("c", "pipeline.surgery.merging.ties")


@pytest.mark.parametrize("reg", [MERGE_METHODS, ROUTER_INITS, TIES_TRIM_SCOPES], ids=lambda r: r.kind)
def test_every_registered_implementation_resolves(reg):
    for name in reg.names():
        assert callable(reg.get(name, "test"))


def test_the_torch_backend_resolves_without_optional_dependencies():
    assert MOE_BACKENDS.get("torch", "test") is TorchBackend
    assert MOE_BACKENDS.names() == ("torch", "megablocks")


@pytest.mark.parametrize("key, value, kind", [
    ("fusion.moe_backend", "tutel", "MoE backend"),
    ("fusion.router_init", "orthogonal", "router init"),
    ("merge.methods", "[average, slerp]", "merge method"),
    ("merge.ties_trim_scope", "layer", "TIES trim scope"),
])
def test_config_validation_reads_the_registries(key, value, kind):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"{key}={value}"])
    msg = str(err.value)
    bad = value.strip("[]").split(", ")[-1]
    assert "tiny.yaml" in msg and key in msg and f"unknown {kind} {bad!r}" in msg, msg


def test_config_accepts_every_registered_name():
    for name in MOE_BACKENDS.names():    # naming megablocks is valid even where it cannot run
        assert load_config("tiny", [f"fusion.moe_backend={name}"]).fusion.moe_backend == name
    for name in ROUTER_INITS.names():
        assert load_config("tiny", [f"fusion.router_init={name}"]).fusion.router_init == name
    all_methods = "[" + ", ".join(MERGE_METHODS.names()) + "]"
    methods = load_config("tiny", [f"merge.methods={all_methods}"]).merge.methods
    assert methods == list(MERGE_METHODS)
    for name in TIES_TRIM_SCOPES.names():
        assert load_config("tiny", [f"merge.ties_trim_scope={name}"]).merge.ties_trim_scope == name


class RecordingBackend(TorchBackend):
    """A registered backend defined outside the package: the torch computation, counted."""
    calls = 0

    def forward(self, x_TH, routing, experts):
        RecordingBackend.calls += 1
        return super().forward(x_TH, routing, experts)


def test_moe_layer_dispatches_through_the_registry(monkeypatch):
    reg = Registry("MoE backend", {"torch": "pipeline.model.moe_backend:TorchBackend"})
    reg.register("recording", f"{__name__}:RecordingBackend")
    monkeypatch.setattr(moe_module, "MOE_BACKENDS", reg)
    torch.manual_seed(0)
    layer = H3FusionMoE(H3FusionConfig(**TINY))
    x = torch.randn(2, 5, 16)
    ref, ref_routing = layer(x)
    layer.set_backend("recording")
    out, routing = layer(x)
    assert RecordingBackend.calls == 1 and layer.backend == "recording"
    assert torch.equal(out, ref) and torch.equal(routing.topk_idx_TK, ref_routing.topk_idx_TK)
    with pytest.raises(ValueError, match=r"moe_backend: unknown MoE backend 'tutel' \(known: "
                                         r"torch, recording\)"):
        layer.set_backend("tutel")


def test_torch_backend_output_is_bit_identical_to_the_dropless_primitive():
    torch.manual_seed(1)
    layer = H3FusionMoE(H3FusionConfig(**TINY))
    x = torch.randn(3, 7, 16)
    out, routing = layer(x)
    e = layer.experts
    ref, ref_routing = dropless_moe(x.reshape(21, 16), layer.router.weight, e.w1, e.v1, e.w2, 2)
    assert torch.equal(out.reshape(21, 16), ref)
    assert torch.equal(routing.topk_weight_TK, ref_routing.topk_weight_TK)


def test_unknown_router_init_and_merge_method_are_clear_errors(tmp_path):
    from pipeline.surgery.merging import merge_tensor
    from pipeline.surgery.router_init import make_router_weights
    cfg = {"num_hidden_layers": 2, "hidden_size": 8}
    with pytest.raises(ValueError, match=r"unknown router init 'ortho' \(known: zeros, normal, "
                                         r"prompts\)"):
        make_router_weights("ortho", tmp_path, tmp_path, cfg, 3, 0, None)
    zeros = make_router_weights("zeros", tmp_path, tmp_path, cfg, 3, 0, None)
    assert len(zeros) == 2 and zeros[0].shape == (3, 8) and not zeros[0].any()
    ints = torch.arange(4)
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        merge_tensor("slerp", ints, [ints], 1.0, 0.5)    # even for tensors that are not merged


def test_optional_backend_modules_load_only_when_chosen():
    import subprocess
    import sys
    code = ("import sys, torch; from pipeline.model import H3FusionConfig, H3FusionMoE; "
            f"H3FusionMoE(H3FusionConfig(**{TINY!r}))(torch.randn(1, 2, 16)); "
            "print([m for m in sys.modules if m.startswith(('pipeline.backends', 'megablocks'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

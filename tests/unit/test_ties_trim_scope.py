"""TIES trim scope: `model` (the paper: one magnitude threshold over each model's whole task
vector) against a naive reference on the concatenation; `tensor` (mergekit) unchanged."""
import json
import math
import shutil

import pytest
import torch

from pipeline.surgery import merging
from pipeline.commands import main as cli_main
from pipeline.config import ConfigError, load_config
from surgery_fixtures import make_family

T = torch.tensor


def _old_ties(base, tensors, density, scale):
    """The per-tensor TIES as it was before trim scopes existed (verbatim maths)."""
    base32 = base.float()
    trimmed = torch.stack([merging.trim_to_density(t.float() - base32, density) for t in tensors])
    elected_sign = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected_sign) & (trimmed != 0)
    kept_sum = (trimmed * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp_min(1)
    return (base32 + scale * kept_sum / count).to(base.dtype)


def _naive_model_ties(base, models, density, scale):
    """Concatenate every floating task-vector entry per model, threshold at the k-th largest
    magnitude (torch.kthvalue), keep |τ| >= it, then elect / disjoint-mean on the concatenation."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    flat_base = torch.cat([base[k].float().reshape(-1) for k in keys])
    taus = [torch.cat([m[k].float().reshape(-1) for k in keys]) - flat_base for m in models]
    trimmed, thresholds = [], []
    for tau in taus:
        n = tau.numel()
        keep = math.ceil(density * n)
        thr = tau.abs().kthvalue(n - keep + 1).values
        thresholds.append(float(thr))
        trimmed.append(torch.where(tau.abs() >= thr, tau, torch.zeros(())))
    trimmed = torch.stack(trimmed)
    sign = torch.sign(trimmed.sum(0))
    agrees = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = flat_base + scale * (trimmed * agrees).sum(0) / agrees.sum(0).clamp_min(1)
    out, at = {}, 0
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        out[k] = merged[at:at + v.numel()].view(v.shape).to(v.dtype)
        at += v.numel()
    return out, thresholds


def _family(seed, quantum=None, dtype=torch.float32):
    """A base and three experts: tensors of different sizes and delta scales, an int buffer,
    some frozen (zero-delta) tensors; `quantum` rounds the deltas to create exact ties."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"embed": (7, 5), "attn": (5, 5), "mlp.up": (11, 5), "mlp.down": (5, 11), "norm": (5,)}
    scales = {"embed": 0.0, "attn": 0.0, "mlp.up": 1.0, "mlp.down": 0.05, "norm": 3.0}
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(6)
    models = []
    for _ in range(3):
        m = {}
        for k, v in base.items():
            if not v.is_floating_point():
                m[k] = v.clone()
                continue
            delta = scales[k] * torch.randn(v.shape, generator=gen)
            if quantum:
                delta = torch.round(delta / quantum) * quantum
            m[k] = (v.float() + delta).to(dtype)
        models.append(m)
    return base, models


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.73, 1.0])
@pytest.mark.parametrize("quantum", [None, 0.25])
def test_model_scope_equals_naive_concatenation(density, quantum):
    base, models = _family(seed=int(density * 100), quantum=quantum)
    want, want_thr = _naive_model_ties(base, models, density, scale=0.8)
    thr = merging.model_trim_thresholds(list(base), base.__getitem__,
                                        [m.__getitem__ for m in models], density)
    assert thr == want_thr                       # exact: the radix select finds the k-th value
    got = merging.merge_state_dicts("ties", base, models, scale=0.8, density=density)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_model_scope_in_bf16_thresholds_the_fp32_task_vector():
    base, models = _family(seed=5, dtype=torch.bfloat16)
    want, _ = _naive_model_ties(base, models, 0.3, scale=1.0)
    got = merging.merge_state_dicts("ties", base, models, scale=1.0, density=0.3)
    for k in want:
        assert got[k].dtype == base[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_tensor_scope_reproduces_the_per_tensor_ties(density):
    base, models = _family(seed=3)
    got = merging.merge_state_dicts("ties", base, models, scale=0.6, density=density,
                                    trim_scope="tensor")
    for k, v in base.items():
        tensors = [m[k] for m in models]
        want = _old_ties(v, tensors, density, 0.6) if v.is_floating_point() else v
        assert torch.equal(got[k], want), k
        per_tensor = {"scale": 0.6, "density": density}   # no context: each tensor on its own
        assert torch.equal(got[k], merging.merge_tensor("ties", v, tensors, per_tensor)), k


def test_model_and_tensor_scopes_differ_by_hand():
    # one model; tensor a moved a lot, tensor b a little; density 0.5 keeps 2 of 4 entries
    base = {"a": T([0.0, 0.0]), "b": T([0.0, 0.0])}
    model = {"a": T([4.0, 3.0]), "b": T([0.1, 0.2])}
    whole = merging.merge_state_dicts("ties", base, [model], scale=1.0, density=0.5)
    assert torch.equal(whole["a"], T([4.0, 3.0])) and torch.equal(whole["b"], T([0.0, 0.0]))
    per = merging.merge_state_dicts("ties", base, [model], scale=1.0, density=0.5,
                                    trim_scope="tensor")
    assert torch.equal(per["a"], T([4.0, 0.0])) and torch.equal(per["b"], T([0.0, 0.2]))


def test_threshold_ties_are_all_kept_as_in_the_authors_code():
    base = {"a": torch.zeros(4)}
    model = {"a": T([1.0, -1.0, 1.0, 0.5])}    # the 2nd largest |τ| (1.0) is shared by three
    got = merging.merge_state_dicts("ties", base, [model], scale=1.0, density=0.5)
    assert torch.equal(got["a"], T([1.0, -1.0, 1.0, 0.0]))


def test_other_methods_refuse_the_scope_and_unknown_scopes_are_errors():
    base, models = _family(seed=4)
    for method in ("average", "task_arithmetic"):
        with pytest.raises(ValueError, match=f"unknown setting 'trim_scope' of merge method "
                                             f"'{method}'"):
            merging.merge_state_dicts(method, base, models, trim_scope="model")
    with pytest.raises(ValueError, match="unknown TIES trim scope 'layer' \\(known: model, tensor\\)"):
        merging.merge_state_dicts("ties", base, models, trim_scope="layer")
    with pytest.raises(ValueError, match="density must be in"):
        merging.model_trim_thresholds(["a"], base.__getitem__, [base.__getitem__], 0.0)


def test_config_key_defaults_to_the_paper_and_is_validated():
    assert load_config("tiny").merge.ties_trim_scope == "model"
    assert load_config("tiny", ["merge.ties_trim_scope=tensor"]).merge.ties_trim_scope == "tensor"
    with pytest.raises(ConfigError, match="merge.ties_trim_scope: unknown TIES trim scope 'layer'"):
        load_config("tiny", ["merge.ties_trim_scope=layer"])


def test_run_merge_redoes_a_ties_merge_made_with_another_trim_scope(tmp_path, capsys):
    base, experts = make_family(tmp_path / "family")
    run = tmp_path / "run"
    shutil.copytree(base, run / "base")
    for name, path in experts.items():
        shutil.copytree(path, run / "experts" / name)
    merge = ["merge", "--run-dir", str(run), "--methods", "ties", "task_arithmetic"]
    assert cli_main(merge + ["--set", "ties_trim_scope=tensor"]) == 0
    manifest = run / "merges" / "ties" / merging.MANIFEST
    assert json.loads(manifest.read_text())["trim_scope"] == "tensor"
    capsys.readouterr()
    assert cli_main(merge) == 0                    # the default, model: ties is redone
    out = capsys.readouterr().out
    assert "ties: " in out and "other trim_scope; redoing it" in out
    assert "task_arithmetic: " in out and "is complete, skipping" in out   # unaffected
    made = json.loads(manifest.read_text())
    assert made["trim_scope"] == "model" and len(made["trim_thresholds"]) == 3
    assert cli_main(merge) == 0
    assert "other" not in capsys.readouterr().out  # now up to date

"""Merging baselines: hand-computed small cases, then streaming merges of tiny Llama dirs."""
import json

import pytest
import torch

from pipeline.surgery import merging
from pipeline.commands import main as cli_main
from surgery_fixtures import TASK_NAMES, dense_state, make_family, save_tiny_llama, tiny_llama_config

T = torch.tensor


def test_average_by_hand():
    got = merging.average([T([1.0, 2.0]), T([3.0, 4.0]), T([5.0, 9.0])])
    assert torch.equal(got, T([3.0, 5.0]))


def test_task_arithmetic_by_hand():
    got = merging.task_arithmetic(T([1.0, 1.0]), [T([2.0, 0.0]), T([3.0, 1.0])], scale=0.5)
    assert torch.equal(got, T([2.5, 0.5]))          # 1 + 0.5 * (1 + 2), 1 + 0.5 * (-1 + 0)


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(merging.trim_to_density(T([3.0, -1.0, 0.5, -2.0]), 0.5),
                       T([3.0, 0.0, 0.0, -2.0]))
    assert torch.equal(merging.trim_to_density(T([[1.0, -5.0], [2.0, 0.1]]), 0.25),
                       T([[0.0, -5.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="density must be in"):
        merging.trim_to_density(T([1.0]), 0.0)


def test_ties_by_hand():
    base = T([1.0, 1.0, 1.0, 1.0])
    taus = [T([3.0, -1.0, 0.5, -2.0]), T([-1.5, -4.0, 0.2, 1.0]), T([2.0, 1.0, -3.0, 0.1])]
    # trimmed (density 0.5): [3,0,0,-2], [-1.5,-4,0,0], [2,0,-3,0]
    # elected sign of the sums [3.5,-4,-3,-2]: [+,-,-,-]; disjoint means: [2.5,-4,-3,-2]
    got = merging.ties(base, [base + t for t in taus], density=0.5, scale=1.0)
    assert torch.equal(got, T([3.5, -3.0, -2.0, -1.0]))
    half = merging.ties(base, [base + t for t in taus], density=0.5, scale=0.5)
    assert torch.equal(half, T([2.25, -1.0, -0.5, 0.0]))


def test_ties_elects_by_total_magnitude_not_by_count():
    base = T([0.0])
    got = merging.ties(base, [T([1.0]), T([1.0]), T([-3.0])], density=1.0)
    assert torch.equal(got, T([-3.0]))             # two small positives lose to one large negative


def test_ties_entry_trimmed_everywhere_keeps_the_base():
    base = T([5.0, 5.0])
    got = merging.ties(base, [T([9.0, 5.1]), T([8.0, 4.9])], density=0.5)
    assert torch.equal(got, T([8.5, 5.0]))


def test_dtype_is_preserved_and_math_is_fp32():
    a, b = T([1.0, 2.0], dtype=torch.bfloat16), T([2.0, 3.0], dtype=torch.bfloat16)
    assert merging.average([a, b]).dtype == torch.bfloat16
    assert merging.task_arithmetic(a, [b], 1.0).dtype == torch.bfloat16
    ids = T([1, 2])
    assert torch.equal(merging.merge_tensor("ties", ids, [ids + 1]), ids)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.mark.parametrize("method,scope", [(m, "model") for m in merging.METHODS]
                         + [("ties", "tensor")])
def test_streaming_merge_matches_the_pure_functions(family, tmp_path, method, scope):
    from transformers import LlamaForCausalLM
    base, experts = family
    # each method's own settings (a method refuses one it does not read)
    settings = {"average": {}, "task_arithmetic": {"scale": 0.7},
                "ties": {"scale": 0.7, "density": 0.3, "trim_scope": scope}}[method]
    out = merging.merge_checkpoints(method, base, experts, tmp_path / method,
                                    max_shard_bytes=40_000, **settings)
    merged, base_sd = dense_state(out), dense_state(base)
    models = [dense_state(d) for d in experts.values()]
    want = merging.merge_state_dicts(method, base_sd, models, **settings)
    for key, value in base_sd.items():
        assert torch.equal(merged[key], want[key]), key
        if method != "ties" or scope == "tensor":   # per-tensor maths: one tensor at a time
            assert torch.equal(merged[key], merging.merge_tensor(
                method, value, [m[key] for m in models], settings)), key
    attn = "model.layers.0.self_attn.q_proj.weight"   # equal in all inputs: unchanged by any method
    assert torch.equal(merged[attn], base_sd[attn])
    mlp = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(merged[mlp], base_sd[mlp])
    manifest = json.loads((out / merging.MANIFEST).read_text())
    assert manifest["method"] == method and [m["name"] for m in manifest["models"]] == list(TASK_NAMES)
    assert manifest.get("trim_scope") == (scope if method == "ties" else None)
    LlamaForCausalLM.from_pretrained(out)


def test_merge_validation(family, tmp_path):
    base, experts = family
    other = tmp_path / "wide"
    save_tiny_llama(other, seed=3, config=tiny_llama_config(hidden_size=64))
    with pytest.raises(ValueError, match="hidden_size=64.*differs"):
        merging.merge_checkpoints("average", base, {**experts, "honest": other}, tmp_path / "o")
    with pytest.raises(ValueError, match="unknown merge method 'slerp' \\(known: average, "
                                         "task_arithmetic, ties\\)"):
        merging.merge_checkpoints("slerp", base, experts, tmp_path / "o")
    merging.merge_checkpoints("average", base, experts, tmp_path / "o")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merging.merge_checkpoints("average", base, experts, tmp_path / "o")
    merging.merge_checkpoints("ties", base, experts, tmp_path / "o", overwrite=True)
    assert json.loads((tmp_path / "o" / merging.MANIFEST).read_text())["method"] == "ties"


def test_h3fusion_merge_on_a_run_dir(family, tmp_path, capsys):
    import shutil
    base, experts = family
    run = tmp_path / "run"
    shutil.copytree(base, run / "base")
    for name, path in experts.items():
        shutil.copytree(path, run / "experts" / name)
    rc = cli_main(["merge", "--run-dir", str(run), "--set", "ties_density=0.25",
                   "--set", "task_arithmetic_scale=0.3"])
    assert rc == 0
    for method in merging.METHODS:
        manifest = json.loads((run / "merges" / method / merging.MANIFEST).read_text())
        assert manifest["method"] == method
    assert json.loads((run / "merges/ties" / merging.MANIFEST).read_text())["density"] == 0.25
    assert json.loads((run / "merges/task_arithmetic" / merging.MANIFEST).read_text())["scale"] == 0.3
    before = (run / "merges/average/model.safetensors").stat().st_mtime_ns
    assert cli_main(["merge", "--run-dir", str(run), "--methods", "average"]) == 0
    assert "complete, skipping" in capsys.readouterr().out
    assert (run / "merges/average/model.safetensors").stat().st_mtime_ns == before


def test_merge_tool_cli(family, tmp_path):
    base, experts = family
    models = [f"{n}={d}" for n, d in experts.items()]
    rc = cli_main(["surgery", "merge", "--method", "task_arithmetic", "--base", str(base),
                   "--models", *models, "--out", str(tmp_path / "ta"), "--scale", "0.2"])
    assert rc == 0
    assert json.loads((tmp_path / "ta" / merging.MANIFEST).read_text())["scale"] == 0.2

"""data.real.harmless_benign_rows: benign Alpaca rows in the harmless training set, taken from the
helpful training rows past the cap (no row shared between the experts), never an eval prompt."""
import pytest

from pipeline.config import ConfigError, RealDataConfig, load_config
from pipeline.dimensions import DEFAULT_DIMENSIONS, resolve_dimensions
from pipeline.data.overlap import normalise
from pipeline.data.real import REAL_REFUSALS, build_real

DIMS = resolve_dimensions(DEFAULT_DIMENSIONS, {})


@pytest.fixture(scope="module")
def real_kw(real_data_paths, shared_data):
    return dict(real_data_paths, harmless_train_prompts=str(shared_data / "safety/advbench/adv_bench.prompt"), max_train_per_task=512)


@pytest.fixture(scope="module")
def both(real_kw):
    return build_real(RealDataConfig(**real_kw), DIMS), build_real(RealDataConfig(**real_kw, harmless_benign_rows=200), DIMS)


def _key(r):
    return (r["instruction"], r["input"], r["response"])


def test_benign_rows_share_the_cap_and_come_from_unused_alpaca_rows(both, real_kw):
    (off, off_ev, _, _), (on, on_ev, _, src) = both
    harmless = on["harmless"]["train"]
    assert len(harmless) == 512
    refusals = [r for r in harmless if r["response"] in REAL_REFUSALS]
    benign = [r for r in harmless if r["response"] not in REAL_REFUSALS]
    assert len(benign) == 200 and src["dedup"]["harmless"]["harmless_benign_alpaca_rows"] == 200
    # the refusal rows are the first 312 of the feature-off set; every row trains the harmless
    # expert (task), the benign ones carry the helpful routing label (task_label)
    assert sorted(map(_key, refusals)) == sorted(map(_key, off["harmless"]["train"][:312]))
    assert all(r["task"] == "harmless" and "benign" not in r for r in harmless)
    assert all(r["task_label"] == [0, 1, 0] for r in refusals)
    assert all(r["task_label"] == [1, 0, 0] for r in benign)
    # nothing else moves: the other dimensions, every eval split and the harmless dev/test SFT rows
    assert on["helpful"] == off["helpful"] and on["honest"] == off["honest"] and on_ev == off_ev
    assert on["harmless"]["dev"] == off["harmless"]["dev"]
    # no benign row is a helpful training row, and none is an eval prompt or target of any split
    assert not set(map(_key, benign)) & set(map(_key, on["helpful"]["train"]))
    eval_texts = {normalise(t) for dim in on_ev.values() for rows in dim.values() for r in rows
                  for t in [r["instruction"], r["reference"], *r["chosen"], *r["rejected"]]}
    assert not {normalise(r["instruction"]) for r in benign} & eval_texts
    assert not {normalise(r["response"]) for r in benign} & eval_texts


def test_benign_rows_are_the_same_every_build(both, real_kw):
    again = build_real(RealDataConfig(**real_kw, harmless_benign_rows=200), DIMS)
    assert again[0]["harmless"]["train"] == both[1][0]["harmless"]["train"]


def test_too_many_benign_rows_is_an_error_naming_the_key(real_kw, shared_data):
    with pytest.raises(ConfigError, match="only 1283 Alpaca training rows lie past the helpful cap"):
        build_real(RealDataConfig(**{**real_kw, "max_train_per_task": 512}, harmless_benign_rows=1300), DIMS)


@pytest.mark.parametrize("sets, needle", [
    (["data.real.harmless_benign_rows=-1"], "data.real.harmless_benign_rows"),
    (["data.real.harmless_benign_rows=10"], r"max_train_per_task \(0, which must then be set\)"),
    (["data.real.harmless_benign_rows=64", "data.real.max_train_per_task=64"], "must be below"),
])
def test_bad_benign_settings_fail_at_load(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smollm2-135m" if "max_train_per_task=64" in sets[-1] else "tiny", sets)

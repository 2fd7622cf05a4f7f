"""pipeline/timing.py (ground floor): the profilers' one timing harness, against naive references."""
import math
import statistics
import time

import pytest
import torch

from pipeline import timing


@pytest.mark.parametrize("times", [[0.3], [0.4, 0.1], [0.5, 0.1, 0.3, 0.2, 0.9], [2.0, 1.0, 4.0, 3.0]])
def test_time_stats_against_a_naive_reference(times):
    st = timing.time_stats(times)
    ordered = sorted(times)
    n = len(ordered)
    naive_median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    assert st["median_s"] == pytest.approx(naive_median)
    assert (st["min_s"], st["max_s"]) == (ordered[0], ordered[-1])
    assert st["times_s"] == times                     # kept in the order measured
    if n == 1:
        assert st["iqr_s"] == 0.0
    else:
        q = statistics.quantiles(ordered, n=4)
        assert st["iqr_s"] == pytest.approx(q[2] - q[0]) and st["iqr_s"] >= 0
    with pytest.raises(ValueError, match="no times"):
        timing.time_stats([])


def test_time_call_returns_the_result_and_at_least_the_time_spent():
    seconds, out = timing.time_call(lambda: time.sleep(0.02) or "done", torch.device("cpu"))
    assert out == "done" and 0.02 <= seconds < 5


def test_round_robin_interleaves_the_calls_after_each_ones_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    got = timing.time_round_robin(fns, repeats=3, device=torch.device("cpu"), warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert got.outputs == {"a": 1, "b": 2}
    assert all(len(t) == 3 and min(t) >= 0 for t in got.times_s.values())
    assert all(m > 0 for m in got.peak_mem_mb.values())


def test_dense_matmul_flops_and_product_and_the_peak_rate():
    torch.manual_seed(0)
    flops, fn = timing.dense_matmul(torch.device("cpu"), torch.float32, 3, 4, 5)
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert flops == 2 * 3 * 4 * 5 and torch.equal(fn(), a @ b)
    rate = timing.matmul_peak(torch.float32, n=64, repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_load_average_rounded_or_none_where_the_platform_has_none(monkeypatch):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (1.23456, 0.0, 0.0))
    assert timing.load_avg_1m() == 1.23

    def missing():
        raise OSError("no load average")
    monkeypatch.setattr(timing.os, "getloadavg", missing)
    assert timing.load_avg_1m() is None

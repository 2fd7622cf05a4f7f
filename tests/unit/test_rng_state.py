"""Exact resume on GPU (issue 31, part 6): a checkpoint's rank state carries the CUDA RNG state of
every local device and resume gives them back in order. torch.cuda is faked with a device list
that records the calls, so the round trip runs on CPU."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from pipeline.train.common import restore_rng_state, rng_state


class FakeDevices:
    """`n` CUDA devices, each with a distinct generator state (a uint8 tensor, like torch's)."""

    def __init__(self, monkeypatch, n: int):
        self.states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(n)]
        self.restored: list[list[torch.Tensor]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.restored.append(list(states)))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_cuda_states_of_every_device_round_trip_through_a_checkpoint(monkeypatch, tmp_path):
    devices = FakeDevices(monkeypatch, 3)
    state = rng_state()
    assert [s.tolist() for s in state["cuda"]] == [s.tolist() for s in devices.states]
    torch.save(state, tmp_path / "rank_state_00000.pt")    # as DsCheckpoints saves it
    expected = _draws()
    _draws()                                              # move every CPU stream on
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # same device count: no warning
        restore_rng_state(torch.load(tmp_path / "rank_state_00000.pt", weights_only=False))
    assert _draws() == expected
    assert len(devices.restored) == 1                     # one call, every device, in order
    assert [s.tolist() for s in devices.restored[0]] == [s.tolist() for s in devices.states]


def test_fewer_devices_on_resume_restores_what_fits_and_warns(monkeypatch):
    saved = rng_state() | {"cuda": [torch.full((16,), v, dtype=torch.uint8) for v in (1, 2)]}
    devices = FakeDevices(monkeypatch, 1)
    with pytest.warns(RuntimeWarning, match=r"CUDA RNG states of 2 device\(s\), this process "
                                            r"sees 1: restored the first 1"):
        restore_rng_state(saved)
    assert [s.tolist() for s in devices.restored[0]] == [[1] * 16]


def test_old_checkpoint_without_cuda_states_still_restores(monkeypatch):
    old = {k: v for k, v in rng_state().items() if k != "cuda"}   # as saved before this change
    expected = _draws()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # CPU here: nothing to warn about
        restore_rng_state(old)
    assert _draws() == expected
    devices = FakeDevices(monkeypatch, 2)                 # the same checkpoint resumed on GPUs
    with pytest.warns(RuntimeWarning, match="holds no CUDA RNG states"):
        restore_rng_state(old)
    assert devices.restored == []


def test_cpu_checkpoint_has_no_cuda_key():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert set(rng_state()) == {"python", "numpy", "torch"}

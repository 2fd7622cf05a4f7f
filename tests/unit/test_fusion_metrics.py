import math

import pytest
import torch

from pipeline.train.fusion.metrics import (CollapseDetector, accuracy_by_name, routed_load,
                                           routing_entropy, top1_load,
                                           top1_routing_hits)


def _mask():
    return torch.tensor([[1, 1, 0], [1, 1, 1]])  # B=2, S=3, one pad token


def test_entropy_uniform_and_onehot_and_padding_ignored():
    uniform = torch.full((6, 3), 1 / 3)
    assert routing_entropy([uniform], _mask()).item() == pytest.approx(math.log(3), rel=1e-6)
    onehot = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    onehot[2] = torch.full((3,), 1 / 3)  # the padded token: must not count
    assert routing_entropy([onehot], _mask()).item() == pytest.approx(0.0, abs=1e-6)


def test_loads_count_real_tokens_only():
    topk = torch.tensor([[0, 1], [0, 2], [2, 1], [1, 0], [0, 1], [2, 0]])  # row 2 is padding
    load = top1_load([topk, topk], _mask(), 3)
    assert load.shape == (2, 3)
    assert torch.allclose(load[0], torch.tensor([3, 1, 1]) / 5.0)
    routed = routed_load([topk], _mask(), 3)
    assert torch.allclose(routed[0], torch.tensor([5, 3, 2]) / 10.0)
    assert torch.allclose(routed.sum(1), torch.ones(1))


def test_top1_routing_hits_per_task():
    label = torch.tensor([[1.0, 0, 0], [0, 0.2, 0.8]])  # sample0 helpful, sample1 honest (soft)
    probs = torch.tensor([[.8, .1, .1], [.1, .8, .1], [.9, .05, .05],      # sample 0 (last = pad)
                          [.1, .1, .8], [.1, .1, .8], [.8, .1, .1]])       # sample 1
    correct, total = top1_routing_hits([probs, probs], _mask(), label)
    assert total.tolist() == [4, 0, 6] and correct.tolist() == [2, 0, 4]
    acc = accuracy_by_name(correct, total, ["helpful", "harmless", "honest"])
    assert acc == {"helpful": 0.5, "honest": pytest.approx(4 / 6)}


def test_width_and_token_count_mismatch_are_errors():
    with pytest.raises(ValueError, match="width 2"):
        top1_routing_hits([torch.rand(6, 3)], _mask(), torch.rand(2, 2))
    with pytest.raises(ValueError, match="expected T = B\\*S"):
        routing_entropy([torch.rand(5, 3)], _mask())


def test_collapse_detector_needs_every_layer_and_a_streak():
    det = CollapseDetector(threshold=0.9, steps=3)
    collapsed = torch.tensor([[0.95, 0.05, 0.0], [0.0, 0.99, 0.01]])
    one_layer_ok = torch.tensor([[0.95, 0.05, 0.0], [0.5, 0.5, 0.0]])
    assert [det.update(collapsed) for _ in range(2)] == [False, False]
    assert det.update(one_layer_ok) is False and det.streak == 0
    fired = [det.update(collapsed) for _ in range(5)]
    assert fired == [False, False, True, False, False]  # once per streak
    with pytest.raises(ValueError):
        CollapseDetector(threshold=1.5, steps=1)

"""Fusion losses on hand-computed cases."""
import math

import pytest
import torch

from pipeline.train.fusion.losses import (drift_penalty, expert_drift, expert_param_triples, gating_loss,
                             load_balance_loss, move_snapshot, router_z_loss,
                             sample_routing_probs, snapshot_expert_params)
from pipeline.model import H3FusionConfig, H3FusionForCausalLM

# B=2, S=2, E=2; sample 1's second token is padding (its probs must be ignored)
MASK = torch.tensor([[1, 1], [1, 0]])
LAYER1 = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
LAYER2 = torch.tensor([[0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.0, 1.0]])


def test_sample_probs_average_tokens_then_layers_ignoring_padding():
    p_bar = sample_routing_probs([LAYER1, LAYER2], MASK)
    # sample 0: layers [0.7,0.3],[0.3,0.7] -> [0.5,0.5]; sample 1: [0.5,0.5],[0.3,0.7] -> [0.4,0.6]
    assert torch.allclose(p_bar, torch.tensor([[0.5, 0.5], [0.4, 0.6]]))


def test_gating_loss_is_soft_label_cross_entropy_without_second_softmax():
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = (-math.log(0.5) + -(0.5 * math.log(0.4) + 0.5 * math.log(0.6))) / 2
    assert gating_loss([LAYER1, LAYER2], MASK, labels).item() == pytest.approx(expected, abs=1e-6)


def test_gating_loss_gradient_reaches_probs():
    probs = LAYER1.clone().requires_grad_(True)
    gating_loss([probs], MASK, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).backward()
    # d/dp of -mean_b log p̄_b,y: sample 0 token grads -1/(2*0.7)/2 on expert 0, padding gets 0
    assert probs.grad[0, 0].item() == pytest.approx(-1 / (2 * 0.7) / 2, rel=1e-5)
    assert torch.all(probs.grad[3] == 0)


def test_gating_loss_errors_name_the_problem():
    with pytest.raises(ValueError, match="task_label"):
        gating_loss([LAYER1], MASK, torch.ones(2, 3))
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        gating_loss([LAYER1], torch.tensor([[1, 1], [0, 0]]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="T=3"):
        gating_loss([LAYER1[:3]], MASK, torch.ones(2, 2))


def _triples(rows_per_layer):
    """rows_per_layer: per layer, per weight (w1, v1, w2), an [E*F=2, H=2] list."""
    return [tuple(torch.tensor(w, dtype=torch.float32) for w in layer) for layer in rows_per_layer]


def test_drift_penalty_hand_computed():
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    start = _triples([(zeros, zeros, zeros), (zeros, zeros, zeros)])
    now = _triples([
        ([[3, 0], [0, 0]], [[0, 4], [1, 0]], zeros),      # layer 0: expert0 5, expert1 1
        (zeros, zeros, [[1, 0], [0, 3]]),                 # layer 1: expert0 1, expert1 3
    ])
    assert torch.allclose(expert_drift(now, start, num_experts=2), torch.tensor([3.0, 2.0]))
    assert drift_penalty(now, start, [0.5, 2.0]).item() == pytest.approx(0.5 * 3 + 2 * 2)


def test_drift_penalty_on_model_starts_at_zero_with_finite_grads():
    model = H3FusionForCausalLM(H3FusionConfig(vocab_size=32, hidden_size=16, intermediate_size=8,
                                               num_hidden_layers=2, num_attention_heads=2))
    start = snapshot_expert_params(model)
    penalty = drift_penalty(model, start, [1.0, 1.0, 1.0])
    penalty.backward()
    assert penalty.item() == 0.0
    grads = [p.grad for n, p in model.named_parameters() if ".experts." in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():   # move expert 1 of layer 0 by a known amount in w2 only
        experts = model.model.layers[0].mlp.experts
        experts.w2[experts.expert_rows(1)] += 0.5
    drift = expert_drift(model, start, num_experts=3)
    moved = 0.5 * math.sqrt(8 * 16) / 2   # ‖0.5·1_{F×H}‖ in layer 0, averaged over 2 layers
    assert torch.allclose(drift, torch.tensor([0.0, moved, 0.0]), atol=1e-6)
    assert start[0][2].data_ptr() != experts.w2.data_ptr()   # snapshot is a copy
    with pytest.raises(ValueError, match="snapshot has 1"):
        expert_drift(model, start[:1], num_experts=3)


def test_drift_snapshot_lives_with_the_experts_and_is_never_copied_per_step(monkeypatch):
    model = H3FusionForCausalLM(H3FusionConfig(vocab_size=32, hidden_size=16, intermediate_size=8,
                                               num_hidden_layers=2, num_attention_heads=2))
    start = snapshot_expert_params(model)
    params = [w for triple in expert_param_triples(model) for w in triple]
    snap = [w for triple in start for w in triple]
    assert [w.device for w in snap] == [p.device for p in params]
    with torch.no_grad():
        model.model.layers[1].mlp.experts.v1.add_(0.25)
    expected = drift_penalty(model, start, [1.0, 2.0, 3.0]).item()
    snap_ptrs = {w.data_ptr() for w in snap}
    real_to, calls = torch.Tensor.to, []

    def counting_to(self, *args, **kwargs):
        calls.append(self.data_ptr() in snap_ptrs)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    assert drift_penalty(model, start, [1.0, 2.0, 3.0]).item() == expected   # numbers unchanged
    assert not any(calls)                                                    # no copy of θ⁰
    monkeypatch.undo()
    assert expected > 0
    moved = move_snapshot(start, "meta")          # a snapshot elsewhere is refused, not copied
    assert all(w.device.type == "meta" for triple in moved for w in triple)
    with pytest.raises(ValueError, match="move_snapshot"):
        expert_drift(model, moved, num_experts=3)


def test_load_balance_loss_uniform_skewed_and_masked():
    uniform = torch.full((4, 2), 0.5)
    alternating = torch.tensor([[0], [1], [0], [1]])
    assert load_balance_loss([uniform], [alternating]).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.9, 0.1]] * 4)
    assert load_balance_loss([skewed], [torch.zeros(4, 1, dtype=torch.long)]).item() == pytest.approx(1.8)
    # padding tokens 2,3 (both routed to expert 1 with prob 1) must not count
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.0, 1.0], [0.0, 1.0]])
    idx = torch.tensor([[0], [0], [1], [1]])
    masked = load_balance_loss([probs], [idx], attention_mask_BS=torch.tensor([[1, 1], [0, 0]]))
    assert masked.item() == pytest.approx(1.8)
    # two layers average; top-2 of 2 experts is always balanced: f = [.5,.5]
    both = torch.tensor([[0, 1]] * 4)
    two = load_balance_loss([skewed, uniform], [both, both])
    assert two.item() == pytest.approx((2 * (0.5 * 0.9 + 0.5 * 0.1) + 1.0) / 2)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])   # logsumexp: ln 2, ln 4
    assert router_z_loss([logits]).item() == pytest.approx(2.5 * math.log(2.0) ** 2)
    masked = router_z_loss([logits], attention_mask_BS=torch.tensor([[1, 0]]))
    assert masked.item() == pytest.approx(math.log(2.0) ** 2)


def test_gate_token_mask_selects_positions_that_predict_the_response():
    from pipeline.train.fusion.losses import gate_token_mask
    # row 0: prompt p p, response 7 then EOS 8, one pad; logits at t predict labels[t+1], so the
    # last prompt position (1) is in and the EOS position (3) is out
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, 7, 8]])
    assert torch.equal(gate_token_mask(mask, labels, "all"), mask)
    assert gate_token_mask(mask, labels, "response").tolist() == [[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    # only the position that predicts the first response token (7 in row 0, 5 in row 1)
    assert gate_token_mask(mask, labels, "first_response").tolist() == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="first_response"):
        gate_token_mask(mask, labels, "prompt")


def test_gating_loss_on_response_tokens_ignores_prompt_routing():
    from pipeline.train.fusion.losses import gate_token_mask
    # positions that predict the response (1 and 2: labels[2], labels[3]) routed to expert 2 (the
    # label); the first prompt position and the last (EOS) position to expert 0
    e0, e2 = [0.98, 0.01, 0.01], [0.01, 0.01, 0.98]
    probs = torch.tensor([e0, e2, e2, e0])
    mask, labels = torch.ones(1, 4, dtype=torch.long), torch.tensor([[-100, -100, 3, 4]])
    label = torch.tensor([[0.0, 0.0, 1.0]])
    all_tokens = gating_loss([probs], gate_token_mask(mask, labels, "all"), label)
    response = gating_loss([probs], gate_token_mask(mask, labels, "response"), label)
    assert response.item() == pytest.approx(-math.log(0.98), abs=1e-6)
    assert all_tokens.item() == pytest.approx(-math.log((0.98 + 0.01) / 2), abs=1e-6)


def test_response_span_masks_match_the_label_shift():
    from pipeline.train.fusion.losses import first_response_mask, predicts_response_mask, response_span_masks
    # two sequences: prompt of 3 / 2 tokens, real lengths 6 / 4, padded to 7
    starts, lengths = torch.tensor([3, 2]), torch.tensor([6, 4])
    span, first = response_span_masks(starts, lengths, 7)
    labels = torch.full((2, 7), -100)
    labels[0, 3:6] = torch.tensor([11, 12, 2])     # response tokens + EOS
    labels[1, 2:4] = torch.tensor([13, 2])
    assert torch.equal(span, predicts_response_mask(labels))
    assert span.tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert first.tolist() == [[0, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]]
    assert torch.equal(first, first_response_mask(labels))

"""Activation memory of one training micro step (part of `pipeline.memory_plan`).

Method: count the tensors autograd keeps for the backward pass, layer by layer, as Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1) do for
GPT; the terms here are those of this code (transformers' Llama with SDPA attention, the
pipeline's MoE block with the torch backend's GroupedGLU), read from what each op saves and
checked against `torch.autograd.graph.saved_tensors_hooks` on the tiny model
(tests/unit/test_memory_plan.py). T = b*s tokens of the micro batch, p = bytes of an activation
element (bf16 2, fp32 4), h hidden, F ffn, a heads, V vocab, L layers, E experts, K top-k,
f = pairs a rank computes per own pair (1; `ep*ceil(E/ep)/E` under expert parallelism).

Per decoder layer, in bytes:
- norms: 2 * 4*T*h (each RMSNorm keeps its input in fp32: a copy in bf16, the input in fp32);
- attention: 4*T*h*p (SDPA keeps q, k, v and its output; k, v repeated to all heads under GQA
  when a padding mask is passed) + 4*b*a*s (logsumexp) + 4*b*s*s (the float mask);
- dense FFN: T*h*p (its input) + 4*T*F*p (gate, silu(gate), up, silu*up); the input and
  silu*up only when a linear reading them trains its own weight or a LoRA without dropout
  wraps it (a LoRA with dropout keeps the dropped-out copy instead, counted below);
- MoE: T*h*p (router input) + (f + 1)*K*T*h*p (pair rows in, pair outputs back) +
  4*f*K*T*F*p (per pair gate, up, silu, silu*up) + routing (probabilities and logits T*E*4 each,
  four int64 index vectors of K*T, weights 2*K*T*4);
- LoRA (per wrapped linear): T*r*p; with dropout > 0 also T*in*(p + m) (the dropped-out input
  and its mask: m = 1 byte on CUDA, p on CPU where the mask has the input's dtype); q/k/v wrapped
  without dropout keep their shared input once (T*h*p), o_proj's is the kept SDPA output.
Layer 0's first norm and attention count only when the backward passes through them, and its
FFN / experts' inner activations only when they or something before them train (a router-only
MoE's first layer keeps the router input and the pair outputs only).
Head: final norm 4*T*h, logits T*V*p (kept with the outputs), log-probabilities T*V*4 (saved by
the cross-entropy) and, at the start of backward, their fp32 gradient and the logits' (2*T*V*4).
Gradient checkpointing per decoder layer: L*T*h*p (each layer's input) plus one layer's
activations, recomputed during its backward.
"""
from __future__ import annotations


def _attention(shape: dict, b: int, s: int, p: int) -> int:
    T, h = b * s, shape["hidden_size"]
    return 4 * T * h + 4 * T * h * p + 4 * b * shape["num_attention_heads"] * s + 4 * b * s * s


def _mlp(model, shape: dict, b: int, s: int, p: int, pair_factor: float) -> float:
    T, h, F = b * s, shape["hidden_size"], shape["intermediate_size"]
    if model.kind == "dense":
        keeps = _keeps_input(model)
        return (T * h * p if keeps("gate_proj", "up_proj") else 0) + 3 * T * F * p + \
            (T * F * p if keeps("down_proj") else 0)
    E, K = shape["num_experts"], shape["top_k"]
    pairs = K * T
    routing = 2 * T * E * 4 + 4 * pairs * 8 + 2 * pairs * 4
    return T * h * p + (pair_factor + 1) * pairs * h * p + 4 * pair_factor * pairs * F * p + routing


def _keeps_input(model):
    """keeps(*linears): whether the input of these dense linears is kept as it is."""
    plain = {name for name, _, _, drop in model.lora_sites if not drop}
    return lambda *names: model.ffn_trainable or bool(plain & set(names))


def _lora(model, shape: dict, T: int, p: int, mask: int) -> int:
    out = sum(T * r * p + (T * n_in * (p + mask) if drop else 0) for _, n_in, r, drop in model.lora_sites)
    attn_input = any(not drop and name in ("q_proj", "k_proj", "v_proj")
                     for name, _, _, drop in model.lora_sites)
    return out + (T * shape["hidden_size"] * p if attn_input else 0)


def layer_bytes(model, shape: dict, b: int, s: int, p: int, pair_factor: float = 1.0,
                mask: int = 1) -> float:
    """Bytes one decoder layer keeps for its backward (on the backward path)."""
    T, h = b * s, shape["hidden_size"]
    return (4 * T * h + _attention(shape, b, s, p) + _mlp(model, shape, b, s, p, pair_factor)
            + _lora(model, shape, T, p, mask))


def _first_layer_skip(model, shape: dict, b: int, s: int, p: int, pair_factor: float) -> float:
    """What layer 0 does not keep when the backward stops inside it (module doc)."""
    T, h, F = b * s, shape["hidden_size"], shape["intermediate_size"]
    skip = 0 if model.first_attention_grad else 4 * T * h + _attention(shape, b, s, p)
    if not model.first_mlp_grad:
        pairs = pair_factor * shape.get("top_k", 1) * T if model.kind == "moe" else 0
        skip += pairs * h * p + 4 * (pairs or T) * F * p
    return skip


def head_bytes(shape: dict, b: int, s: int, p: int) -> tuple[int, int]:
    """(saved for backward, also alive at the start of backward) of the final norm, lm_head and
    cross-entropy."""
    T, V = b * s, shape["vocab_size"]
    return 4 * T * shape["hidden_size"] + T * V * 4, T * V * p + 2 * T * V * 4


def activation_bytes(model, shape: dict, b: int, s: int, p: int, pair_factor: float = 1.0,
                     mask: int = 1) -> dict:
    """{no_checkpointing, checkpointing, saved, layer} bytes of one micro step (module doc);
    `saved` is what autograd holds at the end of the forward pass (no checkpointing)."""
    L, T = shape["num_hidden_layers"], b * s
    layer = layer_bytes(model, shape, b, s, p, pair_factor, mask)
    head_saved, head_extra = head_bytes(shape, b, s, p)
    saved = L * layer - _first_layer_skip(model, shape, b, s, p, pair_factor) + head_saved
    ckpt = L * T * shape["hidden_size"] * p + layer + head_saved + head_extra
    return {"no_checkpointing": saved + head_extra, "checkpointing": min(ckpt, saved + head_extra),
            "saved": saved, "layer": layer}

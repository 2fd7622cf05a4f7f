"""`H3FusionForCausalLM`: Llama (attention, norms, embeddings, rotary reused from transformers)
with every MLP replaced by `H3FusionMoE`.

Each decoder layer returns its hidden states plus the routing tensors as a flat tuple (a flat
tuple of tensors survives both reentrant and non-reentrant activation checkpointing); the layer
loop collects them into one `RouterOutput` per layer in `output.router_outputs`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel,
    LlamaRMSNorm, LlamaRotaryEmbedding,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration import H3FusionConfig
from .moe import GLUExperts, H3FusionMoE
from .routing import RouterOutput


@dataclass
class H3FusionModelOutput(BaseModelOutputWithPast):
    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class H3FusionCausalLMOutput(CausalLMOutputWithPast):
    router_outputs: tuple[RouterOutput, ...] | None = None


class H3FusionDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer whose `mlp` is the MoE; returns (hidden, *routing tensors)."""

    def __init__(self, config: H3FusionConfig, layer_idx: int):
        nn.Module.__init__(self)   # skip LlamaDecoderLayer.__init__: it would allocate a dense MLP
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = H3FusionMoE(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        moe_out, r = self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states + moe_out, r.logits_TE, r.probs_TE, r.topk_idx_TK,
                r.topk_weight_TK, r.tokens_per_expert_E)


class H3FusionPreTrainedModel(LlamaPreTrainedModel):
    config_class = H3FusionConfig
    config: H3FusionConfig
    _no_split_modules = ["H3FusionDecoderLayer"]
    _can_record_outputs = {"hidden_states": H3FusionDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GLUExperts):
            for w in (module.w1, module.v1, module.w2):
                init.normal_(w, mean=0.0, std=self.config.initializer_range)


class H3FusionModel(H3FusionPreTrainedModel, LlamaModel):
    def __init__(self, config: H3FusionConfig):
        H3FusionPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [H3FusionDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Cache | None = None, inputs_embeds=None, use_cache=None,
                **kwargs) -> H3FusionModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                            + past_seen).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        router_outputs = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, *routing = decoder_layer(
                hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings,
                position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                **kwargs)
            router_outputs.append(RouterOutput(*routing))
        return H3FusionModelOutput(last_hidden_state=self.norm(hidden_states),
                                   past_key_values=past_key_values,
                                   router_outputs=tuple(router_outputs))


class H3FusionForCausalLM(H3FusionPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: H3FusionConfig):
        H3FusionPreTrainedModel.__init__(self, config)
        self.model = H3FusionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model._drop_legacy_routing_top_k()
        return model

    def _drop_legacy_routing_top_k(self) -> None:
        # fused models saved while the routing top-k was still called `top_k` carry it in a
        # generation_config.json derived from the model config, where transformers reads it as
        # top-k *sampling*; such a value is the routing top-k, never a sampling choice
        gen = getattr(self, "generation_config", None)
        if gen is not None and getattr(gen, "_from_model_config", False) \
                and gen.top_k == self.config.num_experts_per_tok:
            gen.top_k = None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Cache | None = None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> H3FusionCausalLMOutput:
        """`loss` is token cross-entropy only; the fusion losses read `router_outputs`."""
        kwargs.pop("return_dict", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return H3FusionCausalLMOutput(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            router_outputs=outputs.router_outputs)

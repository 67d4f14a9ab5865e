"""ViViT (Arnab et al. 2021), model 1 (joint space-time attention): spatio-temporal merging, class token kept.

The layer loop lives in ``VivitModel.forward``, so the patched model forward runs it, carrying sizes and
sources. Proportional attention is the additive mask ``log(size)`` (exact for both eager and SDPA). A
padding ``attention_mask`` from the caller cannot follow merged tokens and is refused when the model
merges; when the caller passes none, none is built (transformers would otherwise build an all-true one
under ``torch.export``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vivit import modeling_vivit as hf
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from vtome.adapters import check_input, grid_positions, keeps_output_capture, swap_class
from vtome.layout import Layout
from vtome.merger import Merger, Track, encode

FAMILY = "ViViT"
ATTENTION = "joint"
DEFAULT_PROP_ATTN = True


class VivitAttention(hf.VivitAttention):
    """Stock attention that also returns the projected keys ``[B, N, H*d]`` (the merging metric)."""

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: object
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        projected_keys = self.k_proj(hidden_states)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = projected_keys.view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        attn_output, attn_weights = attention(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights, projected_keys


class VivitLayer(hf.VivitLayer):
    """Stock pre-LN block taking and returning ``(hidden_states, track)``, merging before the MLP."""

    def forward(
        self, hidden_states: Tensor, track: Track, attention_mask: Tensor | None = None, **kwargs: object
    ) -> tuple[Tensor, Track]:
        merger: Merger = self._vtome
        i = self._vtome_layer
        bias = merger.bias(track, hidden_states.dtype)
        residual = hidden_states
        attn_output, _, keys = self.attention(
            self.layernorm_before(hidden_states), attention_mask if bias is None else bias, **kwargs
        )
        hidden_states = self.dropout(attn_output) + residual
        hidden_states, track = merger.merge(i, hidden_states, track, keys)
        residual = hidden_states
        hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states + residual, track


@keeps_output_capture
class VivitModel(hf.VivitModel):
    """Stock forward running the patched layers with sizes and sources."""

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: Tensor | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPooling:
        merger: Merger | None = self.__dict__.get("_vtome")  # None: built by from_pretrained, not patched
        if merger is not None:
            check_input(merger, self.config, pixel_values, FAMILY)
        embedding_output = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if attention_mask is not None:
            if merger is not None and merger.merges():
                raise ValueError(
                    "vtome: an attention_mask cannot follow merged tokens (a merged token covers several input "
                    "positions); call the model without one, or patch with r=0"
                )
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=embedding_output, attention_mask=attention_mask
            )
        if merger is None:
            hidden_states = embedding_output
            for layer in self.layers:
                hidden_states = layer(hidden_states, attention_mask, **kwargs)
        else:
            hidden_states = encode(merger, self.layers, embedding_output, attention_mask, **kwargs).hidden_states
        sequence_output = self.layernorm(hidden_states)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


def base(model: nn.Module) -> nn.Module:
    return getattr(model, "vivit", model)


def layers(model: nn.Module) -> nn.ModuleList:
    return base(model).layers


def layout(model: nn.Module) -> Layout:
    return Layout(protected=1)


def apply(model: nn.Module, merger: Merger) -> None:
    swap_class(base(model), VivitModel, merger)
    for i, layer in enumerate(layers(model)):
        swap_class(layer, VivitLayer, merger, i)
        swap_class(layer.attention, VivitAttention, merger, i)


def token_positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions ``[N0, 3]`` (class token first, -1), tubelet frames and patch size."""
    c = model.config
    tubelet, patch = c.tubelet_size[0], c.tubelet_size[1]
    grid = grid_positions(c.num_frames // tubelet, c.image_size // patch, tubelet, time_major=True)
    return torch.cat([torch.full((1, 3), -1), grid]), tubelet, patch

"""ViViT (Arnab et al. 2021), model 1 (joint space-time attention): spatio-temporal merging, class token kept.

The layer loop lives in ``VivitModel.forward``, so the patched model forward runs it, carrying sizes and
sources. Proportional attention is the additive mask ``log(size)`` (exact for both eager and SDPA). A
padding ``attention_mask`` from the caller cannot follow merged tokens and is refused when the model
merges; when the caller passes none, none is built (transformers would otherwise build an all-true one
under ``torch.export``).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vivit import modeling_vivit as hf
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from vtome.adapters import (
    Adapter,
    attend,
    block,
    check_input,
    grid_positions,
    merger_of,
    register_outputs,
    with_class_token,
)
from vtome.layout import Layout
from vtome.merger import Track, encode

FAMILY = "ViViT"


# Copied from transformers.models.vivit.modeling_vivit.VivitAttention.forward (5.x), with the keys returned
class VivitAttention(hf.VivitAttention):
    """Stock attention that also returns the projected keys ``[B, N, H*d]`` (the merging metric)."""

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: object
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        context, probs, keys = attend(
            self,
            hidden_states,
            (self.q_proj, self.k_proj, self.v_proj),
            self.head_dim,
            attention_mask,
            ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward),
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )
        return self.o_proj(context.contiguous()), probs, keys


# Copied from transformers.models.vivit.modeling_vivit.VivitLayer.forward (5.x), with the merge step
class VivitLayer(hf.VivitLayer):
    """Stock pre-LN block taking and returning ``(hidden_states, track)``, merging before the MLP."""

    def forward(
        self, hidden_states: Tensor, track: Track, attention_mask: Tensor | None = None, **kwargs: object
    ) -> tuple[Tensor, Track]:
        def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
            mask = attention_mask if bias is None else bias
            out, probs, keys = self.attention(self.layernorm_before(x), mask, **kwargs)
            return self.dropout(out), probs, keys

        def mlp(x: Tensor) -> Tensor:
            return self.dropout(self.mlp(self.layernorm_after(x))) + x

        hidden_states, track, _ = block(self, hidden_states, track, attention, mlp)
        return hidden_states, track


# Copied from transformers.models.vivit.modeling_vivit.VivitModel.forward (5.x), with the patched layer loop
@register_outputs
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
        merger = merger_of(self)  # None: built by from_pretrained, not patched
        if merger is not None:
            check_input(merger, self.config, pixel_values, FAMILY)
        embedding_output = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if attention_mask is not None:
            if merger is not None and merger.settings.plan.merges:
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


def _positions(model: nn.Module) -> tuple[Tensor, int, int]:
    c = model.config
    tubelet, patch = c.tubelet_size[0], c.tubelet_size[1]
    grid = grid_positions(c.num_frames // tubelet, c.image_size // patch, tubelet, time_major=True)
    return with_class_token(grid), tubelet, patch


ADAPTER = Adapter(
    family=FAMILY,
    models=(hf.VivitModel, hf.VivitForVideoClassification),
    base_attr="vivit",
    layers_attr="layers",
    attention="joint",
    prop_attn=True,
    swaps=(("base", VivitModel), ("layer", VivitLayer), ("layer.attention", VivitAttention)),
    layout=lambda model: Layout(protected=1),
    token_positions=_positions,
)

"""ViViT (Arnab et al. 2021), model 1 (joint space-time attention): spatio-temporal merging, class token kept.

The stock layer passes its attention mask to the attention backend, so proportional attention is the
additive mask ``log(size)`` (exact for both eager and SDPA).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from transformers.models.vivit import modeling_vivit as hf

from vtome.models import begin_on_forward, capture_keys, grid_positions, swap_class
from vtome.state import Layout, MergeState

FAMILY = "ViViT"
ATTENTION = "joint"
DEFAULT_PROP_ATTN = True


class VivitLayer(hf.VivitLayer):
    """Stock pre-LN block with proportional attention and the merge before the MLP."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: object) -> Tensor:
        state: MergeState = self._vtome
        bias = state.attn_bias(hidden_states.dtype)
        if attention_mask is not None and state.run.size is not None:
            raise ValueError("vtome: an attention_mask cannot follow merged tokens; call the model without one")
        if bias is not None:
            attention_mask = bias
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        hidden_states = state.merge(self._vtome_layer, hidden_states)
        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        state.last_hidden = hidden_states
        return hidden_states


def base(model: nn.Module) -> nn.Module:
    return getattr(model, "vivit", model)


def layers(model: nn.Module) -> nn.ModuleList:
    return base(model).layers


def layout(model: nn.Module) -> Layout:
    return Layout(protected=1)


def apply(model: nn.Module, state: MergeState) -> list[RemovableHandle]:
    handles = [begin_on_forward(base(model), state, FAMILY)]
    for i, layer in enumerate(layers(model)):
        swap_class(layer, VivitLayer, state, i)
        handles.append(capture_keys(layer.attention.k_proj, state, i))
    return handles


def token_positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions ``[N0, 3]`` (class token first, -1), tubelet frames and patch size."""
    c = model.config
    tubelet, patch = c.tubelet_size[0], c.tubelet_size[1]
    grid = grid_positions(c.num_frames // tubelet, c.image_size // patch, tubelet, time_major=True)
    return torch.cat([torch.full((1, 3), -1), grid]), tubelet, patch

"""VideoMAE (Tong et al. 2022): joint space-time attention, spatio-temporal merging over the whole clip.

No class token; the classifier mean-pools, and once tokens are merged that mean must be weighted by
token size (the original merging code takes a plain mean, which over-weights merged regions).
Proportional attention is off by default, as in the paper's VideoMAE configurations.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.videomae import modeling_videomae as hf

from vtome.models import begin_on_forward, capture_keys, grid_positions, swap_class
from vtome.state import Layout, MergeState

FAMILY = "VideoMAE"
ATTENTION = "joint"
DEFAULT_PROP_ATTN = False


class VideoMAESelfAttention(hf.VideoMAESelfAttention):
    """Stock attention, plus ``log(size)`` on the logits once tokens have been merged."""

    def forward(self, hidden_states: Tensor | None = None) -> tuple[Tensor, Tensor]:
        bias = self._vtome.attn_bias(hidden_states.dtype)
        if bias is None:
            return super().forward(hidden_states)
        hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        keys = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        queries = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        context, probs = attention(
            self,
            queries,
            keys,
            values,
            bias,
            is_causal=False,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob,
        )
        return context.reshape(*context.shape[:-2], self.all_head_size), probs


class VideoMAELayer(hf.VideoMAELayer):
    """Stock pre-LN block with the merge between the attention residual and the MLP."""

    def forward(self, hidden_states: Tensor, **kwargs: object) -> Tensor:
        state: MergeState = self._vtome
        attention_output = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = attention_output + hidden_states
        hidden_states = state.merge(self._vtome_layer, hidden_states)
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        state.last_hidden = layer_output
        return layer_output


def base(model: nn.Module) -> nn.Module:
    return getattr(model, "videomae", model)


def layers(model: nn.Module) -> nn.ModuleList:
    return base(model).encoder.layer


def layout(model: nn.Module) -> Layout:
    # Without mean pooling the classifier reads token 0, so that token is protected.
    reads_first = getattr(model, "fc_norm", None) is None and hasattr(model, "classifier")
    return Layout(protected=1 if reads_first else 0)


def apply(model: nn.Module, state: MergeState) -> list[RemovableHandle]:
    handles = [begin_on_forward(base(model), state, FAMILY)]
    for i, layer in enumerate(layers(model)):
        swap_class(layer, VideoMAELayer, state, i)
        swap_class(layer.attention.attention, VideoMAESelfAttention, state, i)
        handles.append(capture_keys(layer.attention.attention.key, state, i))
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None:
        handles.append(fc_norm.register_forward_pre_hook(_size_weighted_pooling(state)))
    return handles


def _size_weighted_pooling(state: MergeState):
    """Replace the classifier's plain token mean by the size-weighted mean once tokens are merged."""

    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        size, tokens = state.run.size, state.last_hidden
        if size is None or tokens is None:
            return None  # nothing merged: the stock mean is exact
        pooled = (tokens.float() * size).sum(1) / size.sum(1)
        return (pooled.to(tokens.dtype),)

    return hook


def token_positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Where each input token sits: ``[N0, 3]`` rows ``(first frame, patch row, patch column)`` (-1 for a
    class token), the frames each token spans (tubelet) and the patch size in pixels."""
    c = model.config
    return (
        grid_positions(c.num_frames // c.tubelet_size, c.image_size // c.patch_size, c.tubelet_size, time_major=True),
        c.tubelet_size,
        c.patch_size,
    )

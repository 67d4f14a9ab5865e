"""Motionformer (our implementation, ``vtome.motionformer``): divided space-time merging inside each frame.

Tokens are ``[CLS] + (frame, patch)`` time-major. Every frame merges the same ``r`` tokens, matched on
the keys of the trajectory attention (whose spatial step attends per frame), so each frame keeps the
same number of patches. The trajectory attention needs no slot alignment across frames: each query
builds its own trajectory by attending within every frame. Proportional attention adds ``log(size)``
to the class token's attention and to each per-frame spatial softmax; the temporal step attends over
trajectory points, which are attention averages, so it gets no size term.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from vtome import motionformer as mf
from vtome.models import begin_on_forward, grid_positions, swap_class
from vtome.state import Layout, MergeState

FAMILY = "Motionformer"
ATTENTION = "trajectory"
DEFAULT_PROP_ATTN = True


class MotionformerLayer(mf.MotionformerLayer):
    """The stock block with proportional attention and the per-frame merge before the MLP."""

    def forward(self, x: Tensor, frames: int) -> Tensor:
        state: MergeState = self._vtome
        size = state.run.size if state.settings.prop_attn else None
        bias = None if size is None else size[..., 0].log().to(x.dtype)
        out, keys = self.attention(self.layernorm_before(x), frames, bias)
        x = x + out
        state.capture_keys(self._vtome_layer, keys)
        x = state.merge(self._vtome_layer, x)
        x = x + self.mlp(self.layernorm_after(x))
        state.last_hidden = x
        return x


def base(model: nn.Module) -> nn.Module:
    return model


def layers(model: nn.Module) -> nn.ModuleList:
    return model.layers


def layout(model: nn.Module) -> Layout:
    return Layout(protected=1, frames=model.config.temporal_positions, time_minor=False)


def apply(model: nn.Module, state: MergeState) -> list[RemovableHandle]:
    for i, layer in enumerate(layers(model)):
        swap_class(layer, MotionformerLayer, state, i)
    return [begin_on_forward(model, state, FAMILY)]


def token_positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions ``[N0, 3]`` (class token first, -1; then frame-major), tubelet, patch size."""
    c = model.config
    grid = grid_positions(c.temporal_positions, c.image_size // c.patch_size, c.tubelet_size, time_major=True)
    return torch.cat([torch.full((1, 3), -1), grid]), c.tubelet_size, c.patch_size

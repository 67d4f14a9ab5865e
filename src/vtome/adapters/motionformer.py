"""Motionformer (``vtome.architectures.motionformer``): divided space-time merging inside each frame.

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

from vtome.adapters import check_input, grid_positions, swap_class
from vtome.architectures import motionformer as mf
from vtome.layout import Layout
from vtome.merger import Merger, Track, encode

FAMILY = "Motionformer"
ATTENTION = "trajectory"
DEFAULT_PROP_ATTN = True


class MotionformerLayer(mf.MotionformerLayer):
    """The stock block taking and returning ``(x, track)``, merging per frame before the MLP."""

    def forward(self, x: Tensor, track: Track, frames: int) -> tuple[Tensor, Track]:
        merger: Merger = self._vtome
        i = self._vtome_layer
        size = track.size
        bias = None if size is None or not merger.settings.prop_attn else size[..., 0].log().to(x.dtype)
        out, keys = self.attention(self.layernorm_before(x), frames, bias)
        x, track = merger.merge(i, x + out, track, keys)
        return x + self.mlp(self.layernorm_after(x)), track


class MotionformerForVideoClassification(mf.MotionformerForVideoClassification):
    """The stock model running the patched layers with sizes and sources."""

    def forward(self, pixel_values: Tensor) -> mf.MotionformerOutput:
        merger: Merger | None = self.__dict__.get("_vtome")
        if merger is None:  # built from this class, not patched: stock
            return super().forward(pixel_values)
        check_input(merger, self.config, pixel_values, FAMILY)
        x = self.embeddings(pixel_values)
        return self.head(encode(merger, self.layers, x, self.config.temporal_positions).hidden_states)


def base(model: nn.Module) -> nn.Module:
    return model


def layers(model: nn.Module) -> nn.ModuleList:
    return model.layers


def layout(model: nn.Module) -> Layout:
    return Layout(protected=1, frames=model.config.temporal_positions, time_minor=False)


def apply(model: nn.Module, merger: Merger) -> None:
    swap_class(model, MotionformerForVideoClassification, merger)
    for i, layer in enumerate(layers(model)):
        swap_class(layer, MotionformerLayer, merger, i)


def token_positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions ``[N0, 3]`` (class token first, -1; then frame-major), tubelet, patch size."""
    c = model.config
    grid = grid_positions(c.temporal_positions, c.image_size // c.patch_size, c.tubelet_size, time_major=True)
    return torch.cat([torch.full((1, 3), -1), grid]), c.tubelet_size, c.patch_size

"""Motionformer (``vtome.architectures.motionformer``): divided space-time merging inside each frame.

Tokens are ``[CLS] + (frame, patch)`` time-major. Every frame merges the same ``r`` tokens, matched on
the keys of the trajectory attention (whose spatial step attends per frame), so each frame keeps the
same number of patches. The trajectory attention needs no slot alignment across frames: each query
builds its own trajectory by attending within every frame. Proportional attention adds ``log(size)``
to the class token's attention and to each per-frame spatial softmax; the temporal step attends over
trajectory points, which are attention averages, so it gets no size term.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from vtome.adapters import Adapter, block, check_input, grid_positions, merger_of, with_class_token
from vtome.architectures import motionformer as mf
from vtome.layout import Layout
from vtome.merger import Track, encode

FAMILY = "Motionformer"


# Copied from vtome.architectures.motionformer.MotionformerLayer.forward, with the merge step
class MotionformerLayer(mf.MotionformerLayer):
    """The stock block taking and returning ``(x, track)``, merging per frame before the MLP."""

    def forward(self, x: Tensor, track: Track, frames: int) -> tuple[Tensor, Track]:
        def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, None, Tensor]:
            out, keys = self.attention(self.layernorm_before(x), frames, bias)
            return out, None, keys

        def mlp(x: Tensor) -> Tensor:
            return x + self.mlp(self.layernorm_after(x))

        x, track, _ = block(self, x, track, attention, mlp)
        return x, track


class MotionformerForVideoClassification(mf.MotionformerForVideoClassification):
    """The stock model running the patched layers with sizes and sources."""

    keeps_user_forward = True  # a user's subclass may override forward (it then runs the patched layers)

    def forward(self, pixel_values: Tensor) -> mf.MotionformerOutput:
        merger = merger_of(self)
        if merger is None:  # built from this class, not patched: stock
            return super().forward(pixel_values)
        check_input(merger, self.config, pixel_values, FAMILY)
        x = self.embeddings(pixel_values)
        return self.head(encode(merger, self.layers, x, self.config.temporal_positions).hidden_states)


def _positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions: class token first, then frame-major."""
    c = model.config
    grid = grid_positions(c.temporal_positions, c.image_size // c.patch_size, c.tubelet_size, time_major=True)
    return with_class_token(grid), c.tubelet_size, c.patch_size


ADAPTER = Adapter(
    family=FAMILY,
    models=(mf.MotionformerForVideoClassification,),
    base_attr=None,
    layers_attr="layers",
    attention="trajectory",
    prop_attn=True,
    swaps=(("model", MotionformerForVideoClassification), ("layer", MotionformerLayer)),
    layout=lambda model: Layout(protected=1, frames=model.config.temporal_positions, time_minor=False),
    token_positions=_positions,
)

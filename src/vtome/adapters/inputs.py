"""What a video model takes, across families: the name of its clip argument and the clip shape it expects.

Most families take ``pixel_values`` and describe the clip with ``num_frames`` / ``num_channels`` /
``image_size`` in their config; V-JEPA 2 takes ``pixel_values_videos`` with ``frames_per_clip`` /
``in_chans`` / ``crop_size``. Tools (bench, eval, sweep, the demo) build inputs through these helpers.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


def input_name(model: nn.Module) -> str:
    """The keyword the model's forward takes the clip ``[B, T, C, H, W]`` as (``pixel_values`` by default)."""
    return getattr(model, "main_input_name", None) or "pixel_values"


def clip_kwargs(model: nn.Module, clip: Tensor) -> dict[str, Tensor]:
    """``{input_name(model): clip}``, for ``model(**clip_kwargs(model, clip))``."""
    return {input_name(model): clip}


def clip_shape(model: nn.Module | object) -> tuple[int, int, int]:
    """``(frames, channels, size)`` of the clips ``model`` (or a model config) is configured for (square
    frames of ``size`` px)."""
    c = getattr(model, "config", model)
    frames = getattr(c, "num_frames", None) or c.frames_per_clip
    channels = getattr(c, "num_channels", None) or getattr(c, "in_chans", 3)
    size = getattr(c, "image_size", None) or c.crop_size
    return int(frames), int(channels), int(size if isinstance(size, int) else size[0])

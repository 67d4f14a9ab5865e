"""Model adapters: one module per architecture family, imported only when a model of that family is patched.

Each adapter module defines:

- ``FAMILY`` (display name), ``DEFAULT_PROP_ATTN`` and ``ATTENTION`` (``"joint"``, ``"divided"`` or
  ``"trajectory"``: which FLOP model applies);
- ``layers(model) -> nn.ModuleList`` and ``base(model) -> nn.Module`` (the module that takes ``pixel_values``);
- ``layout(model) -> Layout``;
- ``apply(model, merger)``: swap in the patched classes (no hooks: the patched forwards carry the merge
  state as arguments and return values, see :mod:`vtome.merger`);
- ``token_positions(model)``: where each input token sits in the video (for drawing merges).

Patched classes are subclasses of the stock ones, defined at module level (so a patched model pickles);
:func:`restore` gives every module its class back.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn as nn
from torch import Tensor

from vtome.merger import Merger

# Patched by class name (as tomesd does), so no model library is imported before it is needed.
REGISTRY: dict[str, str] = {
    "VideoMAEModel": "videomae",
    "VideoMAEForVideoClassification": "videomae",
    "VivitModel": "vivit",
    "VivitForVideoClassification": "vivit",
    "TimesformerModel": "timesformer",
    "TimesformerForVideoClassification": "timesformer",
    "MotionformerForVideoClassification": "motionformer",
    "VJEPA2Model": "vjepa2",
    "VJEPA2ForVideoClassification": "vjepa2",
}


def adapter_for(model: nn.Module) -> ModuleType:
    """The adapter module for ``model``; ``TypeError`` naming the supported classes otherwise."""
    name = type(model).__name__
    if name not in REGISTRY:
        supported = ", ".join(REGISTRY)
        raise TypeError(f"vtome cannot patch a {name}; supported models: {supported}")
    return importlib.import_module(f"vtome.adapters.{REGISTRY[name]}")


def swap_class(module: nn.Module, patched: type[nn.Module], merger: Merger, layer: int | None = None) -> None:
    """Give ``module`` the patched subclass of its class, pointing at ``merger``; :func:`restore` undoes it."""
    module._vtome_original_class = type(module)
    module.__class__ = patched
    module._vtome = merger
    if layer is not None:
        module._vtome_layer = layer


def restore(module: nn.Module) -> None:
    """Undo :func:`swap_class` (no-op on an unpatched module)."""
    original = module.__dict__.pop("_vtome_original_class", None)
    if original is not None:
        module.__class__ = original
    module.__dict__.pop("_vtome", None)
    module.__dict__.pop("_vtome_layer", None)


def keeps_output_capture(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator for a patched subclass of a Hugging Face model: its ``output_hidden_states`` and
    ``output_attentions`` work as the stock class's (transformers looks them up by class name)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # an older transformers: nothing to register
        return cls
    dict.__setitem__(_CAN_RECORD_REGISTRY, str(cls), getattr(cls, "_can_record_outputs", None) or {})
    return cls


def check_input(merger: Merger, config: object, pixel_values: Tensor | None, family: str) -> None:
    """Checks before a patched forward: the clip's shape against the config, and the attention backend."""
    if pixel_values is not None:
        check_frames(pixel_values, config.num_frames, config.num_channels, family)
    if merger.settings.prop_attn:
        check_attention_backend(config)


def check_frames(pixel_values: Tensor, num_frames: int, num_channels: int, family: str) -> None:
    """Clear error for a clip that is not ``[B, T, C, H, W]`` with the model's ``T`` and ``C``."""
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 5:
        raise ValueError(
            f"{family} expects pixel_values of shape [batch, frames, channels, height, width]; got {shape}"
        )
    if shape[1] != num_frames and shape[2] == num_frames and shape[1] == num_channels:
        raise ValueError(
            f"{family} expects pixel_values laid out [B, T, C, H, W]; got {shape}, which looks like [B, C, T, H, W]: "
            "pass pixel_values.transpose(1, 2)"
        )
    if shape[1] != num_frames:
        raise ValueError(
            f"{family} expects clips of {num_frames} frames (config.num_frames), got {shape[1]} in pixel_values "
            f"of shape {shape}; sample {num_frames} frames per clip"
        )
    if shape[2] != num_channels:
        raise ValueError(
            f"{family} expects {num_channels} channels at dim 2 of pixel_values [B, T, C, H, W]; got shape {shape}"
        )


def check_attention_backend(config: object) -> None:
    """Proportional attention needs an additive float mask: only the eager and SDPA backends take one."""
    impl = getattr(config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"proportional attention needs attn_implementation 'eager' or 'sdpa', this model uses {impl!r}; "
            "load it with attn_implementation='sdpa' or patch with prop_attn=False"
        )


def grid_positions(steps: int, side: int, tubelet: int, time_major: bool) -> Tensor:
    """``[steps * side * side, 3]`` rows ``(first frame, row, column)`` of a video token grid, in the
    model's order: time-major (``t*side*side + row*side + col``) or time-minor (``(row*side + col)*steps + t``)."""
    t, y, x = torch.meshgrid(torch.arange(steps), torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([t * tubelet, y, x], dim=-1)
    if not time_major:
        grid = grid.permute(1, 2, 0, 3)
    return grid.reshape(-1, 3)

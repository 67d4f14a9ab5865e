"""Model adapters: one module per architecture family, imported only when a model of that family is patched.

Each adapter module defines:

- ``FAMILY`` (display name), ``DEFAULT_PROP_ATTN`` and ``ATTENTION`` (``"joint"``, ``"divided"`` or
  ``"trajectory"``: which FLOP model applies);
- ``layers(model) -> nn.ModuleList`` and ``base(model) -> nn.Module`` (the module that takes ``pixel_values``);
- ``layout(model) -> Layout``;
- ``apply(model, state) -> list[RemovableHandle]``: swap in the patched classes and install hooks;
- ``token_positions(model)``: where each input token sits in the video (for drawing merges).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from vtome.state import MergeState, check_frames

# Patched by class name (as tomesd does), so no model library is imported before it is needed.
REGISTRY: dict[str, str] = {
    "VideoMAEModel": "videomae",
    "VideoMAEForVideoClassification": "videomae",
    "VivitModel": "vivit",
    "VivitForVideoClassification": "vivit",
    "TimesformerModel": "timesformer",
    "TimesformerForVideoClassification": "timesformer",
    "MotionformerForVideoClassification": "motionformer",
}


def adapter_for(model: nn.Module) -> ModuleType:
    """The adapter module for ``model``; ``TypeError`` naming the supported classes otherwise."""
    name = type(model).__name__
    if name not in REGISTRY:
        supported = ", ".join(REGISTRY)
        raise TypeError(f"vtome cannot patch a {name}; supported models: {supported}")
    return importlib.import_module(f"vtome.models.{REGISTRY[name]}")


def swap_class(module: nn.Module, patched: type[nn.Module], state: MergeState, layer: int) -> None:
    """Give ``module`` the patched subclass of its class; :func:`restore` undoes it."""
    module._vtome_original_class = type(module)
    module.__class__ = patched
    module._vtome = state
    module._vtome_layer = layer


def restore(module: nn.Module) -> None:
    """Undo :func:`swap_class` (no-op on an unpatched module)."""
    original = module.__dict__.pop("_vtome_original_class", None)
    if original is not None:
        module.__class__ = original
    module.__dict__.pop("_vtome", None)
    module.__dict__.pop("_vtome_layer", None)


def capture_keys(linear: nn.Module, state: MergeState, layer: int, part: slice | None = None) -> RemovableHandle:
    """Hook ``linear`` (the key projection, or a fused qkv with ``part`` selecting the keys) to feed the metric."""

    def hook(_module: nn.Module, _args: tuple, out: Tensor) -> None:
        state.capture_keys(layer, out if part is None else out[..., part])

    return linear.register_forward_hook(hook)


def begin_on_forward(base: nn.Module, state: MergeState, family: str) -> RemovableHandle:
    """Reset ``state`` at each forward of ``base`` and check the clip's shape against its config."""
    config = base.config

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        if pixel_values is not None:
            check_frames(pixel_values, config.num_frames, config.num_channels, family)
        if state.settings.prop_attn:
            check_attention_backend(config)
        state.begin()

    return base.register_forward_pre_hook(hook, with_kwargs=True)


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

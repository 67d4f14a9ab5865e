"""Model adapters: one module per architecture family, imported only when a model of that family is patched.

Owns: the adapter contract (:class:`Adapter`, a small declarative spec each family module defines as
``ADAPTER``), the registry from class names to family modules, patching and restoring classes, and the
pieces the families share (attention that returns its keys, the attend -> merge -> MLP block, input checks).

A model is matched by the class names along its class hierarchy (``__mro__``, as tomesd does), so a user's
subclass of a supported model is patched and no model library is imported before it is needed. Patched
classes are subclasses of the stock ones, defined at module level (so a patched model pickles). A module of a
user's subclass gets a class that puts the user's class first and the patched class after it (user methods
and overrides stay in effect); that class pickles and copies through :func:`_rebuild`. :func:`restore` gives
every module its own class back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from vtome.flops import FlopModel
from vtome.layout import Layout
from vtome.merger import Merger, Track

# Class names (anywhere in a model's class hierarchy) -> the family module that patches them.
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


def _no_pooler(model: nn.Module) -> int | None:
    return None


@dataclass(frozen=True)
class Adapter:
    """How vtome patches one model family (each family module defines one as ``ADAPTER``).

    ``base_attr``: the attribute holding the base model on a task model (``"videomae"``; a base model is its
    own base); ``layers_attr``: the path from the base model to its ``nn.ModuleList`` of layers;
    ``attention``: the FLOP model's attention kind (:data:`vtome.flops.ATTENTIONS`); ``prop_attn``: the
    family's default for proportional attention; ``swaps``: ``(path, patched class)`` pairs, where a path
    starts at ``model`` (the model itself, swapped when it is of the patched class's stock class), ``base`` or
    ``layer`` (each encoder layer, which also gives the module its layer index), ``*`` stands for every item of
    a module list; a missing module is skipped, one of another class is refused;
    ``layout(model)``: where the mergeable tokens sit; ``token_positions(model)``: ``([N0, 3]`` input token
    positions ``(first frame, row, column)``, -1 for a class token; frames per token; patch size);
    ``pooler_of(model)``: self-attention layers of an attentive pooler after the encoder (None: none);
    ``models``: the stock classes :func:`vtome.patch` takes (their subclasses too); ``positions``: its attention
    depends on token positions (rotary), which then travel with the tokens.
    """

    family: str
    models: tuple[type[nn.Module], ...]
    base_attr: str | None
    layers_attr: str
    attention: str
    prop_attn: bool
    swaps: tuple[tuple[str, type[nn.Module]], ...]
    layout: Callable[[nn.Module], Layout]
    token_positions: Callable[[nn.Module], tuple[Tensor, int, int]]
    pooler_of: Callable[[nn.Module], int | None] = _no_pooler
    positions: bool = False

    def base(self, model: nn.Module) -> nn.Module:
        """The base model (the one that takes the clip and runs the encoder)."""
        return getattr(model, self.base_attr, model) if self.base_attr else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's layers."""
        return _resolve(self.base(model), self.layers_attr)

    def flop_model(self, model: nn.Module) -> FlopModel:
        c = model.config
        return FlopModel(self.attention, c.hidden_size, self.layout(model).frames, self.pooler_of(model))

    def targets(self, model: nn.Module) -> Iterator[tuple[nn.Module, type[nn.Module], int | None]]:
        """``(module, patched class, layer index or None)`` for every module the patch swaps; ``TypeError`` for a
        module at a swap path that is not of the stock class (e.g. wrapped by the user)."""
        for path, patched in self.swaps:
            root, _, rest = path.partition(".")
            if root == "layer":
                starts = list(enumerate(self.layers(model)))
            else:
                starts = [(None, model if root == "model" else self.base(model))]
            for index, start in starts:
                for module in _resolve_all(start, rest.split(".") if rest else []):
                    if isinstance(module, _stock(patched)):
                        yield module, patched, index
                    elif path != "model":
                        raise TypeError(
                            f"vtome cannot patch this {type(model).__name__}: its module at {path!r} is a "
                            f"{type(module).__name__}, not a {_stock(patched).__name__} (or a subclass)"
                        )


def _resolve(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _resolve_all(module: nn.Module | None, names: list[str]) -> Iterator[nn.Module]:
    """The modules at a path of attribute ``names`` below ``module`` (``*``: each item of a module list)."""
    if module is None:
        return
    if not names:
        yield module
        return
    if names[0] == "*" and isinstance(module, nn.ModuleList):
        children = list(module)
    else:
        children = [getattr(module, names[0], None)]
    for child in children:
        yield from _resolve_all(child, names[1:])


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, found through its class hierarchy; ``TypeError`` naming the supported
    classes otherwise."""
    for cls in type(model).__mro__:
        family = REGISTRY.get(cls.__name__)
        if family is not None:
            adapter: Adapter = importlib.import_module(f"vtome.adapters.{family}").ADAPTER
            if cls in adapter.models:
                return adapter
    raise TypeError(
        f"vtome cannot patch a {type(model).__name__}; supported models: {', '.join(REGISTRY)} (and their subclasses)"
    )


def _stock(patched: type[nn.Module]) -> type[nn.Module]:
    """The stock class a patched class extends."""
    return patched.__bases__[0]


# -- patching classes ----------------------------------------------------------------------------------


def merger_of(module: nn.Module) -> Merger | None:
    """The :class:`Merger` of a patched module, None for a module that is not patched (a patched class can
    also be built unpatched, e.g. by ``from_pretrained``: it then behaves as the stock class)."""
    return module.__dict__.get("_vtome")


def is_root(module: nn.Module) -> bool:
    """Whether ``module`` is a model that :func:`vtome.patch` patched (not one of its submodules)."""
    return module.__dict__.get("_vtome_root", False) is True


def patch_modules(model: nn.Module, adapter: Adapter, merger: Merger) -> None:
    """Swap in ``adapter``'s patched classes, all pointing at ``merger``; :func:`restore` undoes it. Checks
    every module first, so a refusal leaves the model as it was."""
    plan = [(module, _patched_class(type(module), patched), index) for module, patched, index in adapter.targets(model)]
    for module, cls, index in plan:
        module._vtome_original_class = type(module)
        module.__class__ = cls
        module._vtome = merger
        if index is not None:
            module._vtome_layer = index
    model._vtome = merger
    model._vtome_root = True


def restore(module: nn.Module) -> None:
    """Undo :func:`patch_modules` on one module (no-op on an unpatched module)."""
    original = module.__dict__.pop("_vtome_original_class", None)
    if original is not None:
        module.__class__ = original
    for name in ("_vtome", "_vtome_layer", "_vtome_root"):
        module.__dict__.pop(name, None)


def _patched_class(cls: type[nn.Module], patched: type[nn.Module]) -> type[nn.Module]:
    """The class a module of class ``cls`` gets: ``patched`` itself for the stock class; for a user's subclass
    a class composed of both (the user's methods, and its forward where the patched class keeps a user's
    forward). ``TypeError`` when the user's class overrides a ``forward`` the patch must replace."""
    stock = _stock(patched)
    if cls is stock:
        return patched
    if issubclass(cls, patched):  # a patched class built unpatched (e.g. by from_pretrained) stays as it is
        return cls
    # (transformers wraps the forward of every checkpointing layer subclass: compare the functions inside)
    own = inspect.unwrap(cls.forward) is not inspect.unwrap(stock.forward)
    if own and not getattr(patched, "keeps_user_forward", False):
        raise TypeError(
            f"vtome cannot patch {cls.__qualname__}: it overrides forward, which vtome replaces in a "
            f"{stock.__name__} to carry the merge state; keep the stock forward there (override the task model's "
            "forward instead), or patch a model without this override"
        )
    return _composed(cls, patched)


@functools.cache
def _composed(user: type[nn.Module], patched: type[nn.Module]) -> type[nn.Module]:
    # The user's class first where its forward may stay in effect; else the patched forward first (the user's
    # class then only adds methods, and transformers' forward wrapper in it must not shadow the patched one).
    bases = (user, patched) if getattr(patched, "keeps_user_forward", False) else (patched, user)
    # A name of its own (transformers keys its output-capture registry by class name: the user's entry stays).
    composed = type(
        user.__name__,
        bases,
        {"__module__": user.__module__, "__qualname__": f"{user.__qualname__}[vtome]", "_vtome_parts": (user, patched)},
    )
    composed.__reduce_ex__ = _reduce_composed
    return register_outputs(composed, user)


def _reduce_composed(self: nn.Module, protocol: int) -> tuple:
    """Pickle and copy a module of a composed class by its parts (the class itself cannot be named)."""
    return (_rebuild, type(self)._vtome_parts, self.__getstate__())


def _rebuild(user: type[nn.Module], patched: type[nn.Module]) -> nn.Module:
    """A bare module of the class composed from ``user`` and ``patched`` (its state is set by pickle/copy)."""
    cls = _composed(user, patched)
    return cls.__new__(cls)


def register_outputs(cls: type[nn.Module], like: type[nn.Module] | None = None) -> type[nn.Module]:
    """Class decorator for a patched Hugging Face model class: its ``output_hidden_states`` and
    ``output_attentions`` work as those of the stock class (transformers looks them up by class)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # an older transformers: nothing to register
        return cls
    flags = getattr(like or cls, "_can_record_outputs", None) or {}
    dict.__setitem__(_CAN_RECORD_REGISTRY, str(cls), flags)
    return cls


# -- what the families share -------------------------------------------------------------------------------


def attend(
    module: nn.Module,
    hidden_states: Tensor,
    projections: tuple[nn.Module, nn.Module, nn.Module],
    head_dim: int,
    mask: Tensor | None,
    attention: Callable[..., tuple[Tensor, Tensor | None]],
    *,
    scaling: float,
    dropout: float,
    rotate: Callable[[Tensor], Tensor] | None = None,
    **kwargs: object,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Multi-head attention as the Hugging Face families write it, also returning the keys.

    ``hidden_states`` ``[B, N, C]`` is projected by ``projections`` (query, key, value), split into heads of
    ``head_dim``, optionally rotated (``rotate`` on queries and keys ``[B, H, N, d]``, e.g. RoPE) and given to
    ``attention`` (a transformers attention function) with the additive ``mask`` ``[B, 1, 1, N]``. Returns the
    context ``[B, N, H*d]`` (before the output projection), the attention probabilities (or None) and the
    projected keys ``[B, N, H*d]`` before rotation (the merging metric).
    """
    query, key, value = projections
    projected_keys = key(hidden_states)
    shape = (*hidden_states.shape[:-1], projected_keys.shape[-1] // head_dim, head_dim)  # (no -1: batch 0 works)
    queries = query(hidden_states).view(shape).transpose(1, 2)
    keys = projected_keys.view(shape).transpose(1, 2)
    values = value(hidden_states).view(shape).transpose(1, 2)
    if rotate is not None:
        keys, queries = rotate(keys), rotate(queries)
    context, probs = attention(
        module, queries, keys, values, mask, is_causal=False, scaling=scaling, dropout=dropout, **kwargs
    )
    return context.flatten(-2), probs, projected_keys


def block(
    layer: nn.Module,
    hidden_states: Tensor,
    track: Track,
    attention: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None, Tensor]],
    mlp: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Track, Tensor | None]:
    """A pre-LN transformer block with the merge step between attention and MLP.

    ``attention(hidden_states, bias)`` returns the attention branch ``[B, N, C]`` (its residual is added here),
    the attention probabilities (or None) and the keys; ``bias`` is the proportional-attention mask. The sum is
    merged (``layer``'s merger and index), then ``mlp(hidden_states)`` gives the block output with its residual.
    Returns ``(hidden_states, track, probs)``.
    """
    merger: Merger = layer._vtome
    branch, probs, keys = attention(hidden_states, merger.bias(track, hidden_states.dtype))
    hidden_states, track = merger.merge(layer._vtome_layer, branch + hidden_states, track, keys)
    return mlp(hidden_states), track, probs


def check_input(merger: Merger, config: object, pixel_values: Tensor | None, family: str) -> None:
    """Checks before a patched forward: the clip's shape against the config, and the attention backend."""
    if pixel_values is not None:
        check_frames(pixel_values, config.num_frames, config.num_channels, family)
    if merger.settings.prop_attn:
        check_attention_backend(config)


def check_frames(pixel_values: Tensor, num_frames: int, num_channels: int, family: str) -> None:
    """Clear error for a clip that is not ``[B, T, C, H, W]`` with the model's ``T`` and ``C``."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"{family} expects pixel_values as a torch.Tensor [B, T, C, H, W]; got {type(pixel_values)}")
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


def with_class_token(grid: Tensor) -> Tensor:
    """``[N, 3]`` grid positions with a class token row (-1) in front: ``[1 + N, 3]``."""
    return torch.cat([torch.full((1, 3), -1), grid])

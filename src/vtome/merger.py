"""The merge step of a patched model, and the values that travel with the tokens through it.

Owns: :class:`Track` (what travels with the tokens), :func:`merge_step` (one layer's merge: a function of the
plan, the layout, the tokens, their track and the keys), :func:`encode` (the patched encoder loop),
:class:`RunInfo` (the record of the last forward) and :class:`Merger` (what a patched model holds).

- A patched model owns one :class:`Merger` (``model._vtome``; its patched submodules point at the same
  object): its settings (whose :attr:`~vtome.settings.MergeSettings.plan` the step reads), its token layout,
  its FLOP model and ``run``, the record of the last forward. Nothing about a forward in progress is stored on
  it, and it holds no closures, so ``copy.deepcopy`` and pickling give an independent patched model.
- A forward carries its merge state as values. :func:`encode` starts a :class:`Track` (sizes, index map, and
  with ``trace_source`` an identity source map) and passes ``(hidden_states, track)`` to each layer as
  arguments, getting the same back. Inside a layer, the attention takes ``Merger.bias(track, dtype)``
  (proportional attention) and returns its keys with its output; the layer hands them to
  ``Merger.merge(layer, x, track, keys)``. A recomputed layer (gradient checkpointing) therefore sees exactly
  the inputs of its first run.
- What a model needs after the encoder (VideoMAE's size-weighted mean pooling) comes back from the encoder
  as a return value.
- The one write of a forward: at the end of the loop, :func:`encode` replaces ``Merger.run`` with a new
  :class:`RunInfo` (token counts; sizes, index and sources detached, so no activation outlives the forward).
- Random modes with a seed draw from a counter-based hash of (seed, layer, step): a recompute draws the same,
  and a compiled forward needs no generator object.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from vtome.flops import FlopModel, simulate_tokens
from vtome.layout import Layout
from vtome.merge import (
    attention_bias,
    average_tokens,
    bipartite_match,
    key_metric,
    max_merge,
    sum_tokens,
)
from vtome.settings import MergeSettings, Plan


class CapWarning(UserWarning):
    """A layer was asked to merge more than half of its mergeable tokens and was capped."""


@dataclass
class RunInfo:
    """What the last forward of a patched model did.

    ``input_tokens``: tokens entering the first layer; ``tokens_per_layer``: tokens leaving each layer after
    its merge (class token included, whole clip);
    ``size``: ``[B, N, 1]`` input patches each output token stands for (None if nothing was merged);
    ``source``: ``[B, N, N0]`` which input tokens each output token covers (with ``trace_source=True``);
    ``index``: ``[B, N0]`` (long) the output token covering each input token, -1 where it was dropped (None if
    nothing was merged); :func:`vtome.unmerge` uses it. All detached.
    ``flop_ratio``: unpatched / patched transformer FLOPs of this forward (:class:`vtome.flops.FlopModel`);
    ``batch``: clips in the forward.
    """

    input_tokens: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    size: Tensor | None = None
    source: Tensor | None = None
    index: Tensor | None = None
    flop_ratio: float = 1.0
    batch: int = 0


@dataclass(frozen=True)
class Track:
    """What travels with the tokens ``[B, N, C]`` through the encoder, as an argument and a return value of
    every patched layer (never stored on a module):

    ``size`` ``[B, N, 1]`` float32, input patches each token stands for (None: all ones, nothing merged);
    ``index`` ``[B, N0]`` long, for each input token the current token that covers it, -1 where it was
    dropped (None: the identity); in divided layouts ``[B*T, n0]``, per frame the current slot of each of its
    input slots (a token never leaves its frame; :meth:`Layout.global_index` gives positions);
    ``source`` ``[B, N, N0]`` float32 with ``trace_source`` (else None);
    ``positions`` ``[B, N, k]`` float32 for models whose attention depends on token positions (RoPE), each
    merged token at the size-weighted mean of its inputs or at its destination token's position (None for
    the others).
    """

    size: Tensor | None = None
    index: Tensor | None = None
    source: Tensor | None = None
    positions: Tensor | None = None

    def detach(self) -> Track:
        """The same values with no autograd history (they are counts and positions, not activations)."""
        values = (self.size, self.index, self.source, self.positions)
        return Track(*(None if t is None else t.detach() for t in values))


def merge_step(
    plan: Plan, layout: Layout, num_heads: int, layer: int, x: Tensor, track: Track, keys: Tensor, grouped: bool
) -> tuple[Tensor, Track]:
    """One layer's merge: tokens ``x`` ``[B, N, C]`` and their :class:`Track` -> the same with ``N'`` tokens,
    matched on the attention's ``keys`` as ``plan`` says for ``layer``.

    ``keys`` are projected ``[B, N, H*d]`` or per head ``[B, H, N, d]`` in model token order, or with ``grouped``
    already in group layout (``[G, n, H*d]`` or ``[G, H, n, d]``: a divided model's per-frame keys). Each step
    removes ``min(r, half the mergeable tokens)`` (groups of a divided layout: per frame).
    """
    metric = key_metric(keys.detach(), num_heads, plan.head_aggregation)  # matching needs no gradient
    if not (grouped or layout.frames is None):  # a joint layout's group is the sequence
        metric = layout.split(metric)[1]
    frames = layout.frames if layout.frames is not None and plan.aligned else 1
    if frames > 1:  # one matching per clip, on the keys averaged over its frames
        metric = metric.unflatten(0, (metric.shape[0] // frames, frames)).mean(1)
    p, r = layout.group_protected, plan.r_at(layer)
    dest, removed, discards = None, 0, False
    group_size = kept = None  # sizes in group layout (repeated steps) and positions kept in place
    for step in range(plan.steps[layer]):
        r_step = min(r, max_merge(metric.shape[1] - p))
        if r_step == 0:
            break
        match = bipartite_match(
            metric,
            r_step,
            protected=p,
            mode=plan.mode,
            threshold=plan.threshold,
            order=plan.order,
            key=_key(plan, layer, step),
        )
        repeated = match.repeat(frames)
        if step + 1 < plan.steps[layer]:  # a repeated step matches on the merged keys
            if group_size is None:
                group_size = (
                    layout.split(track.size)[1]
                    if track.size is not None
                    else torch.ones(*repeated.dest.shape, 1, device=x.device, dtype=torch.float32)
                )
            clip_size = group_size.unflatten(0, (group_size.shape[0] // frames, frames)).mean(1)
            metric = match.average(metric, clip_size)[0]
            group_size = repeated(group_size)
        if track.positions is not None and plan.position_merge == "destination":
            kept = repeated.keep(layout.split(track.positions)[1] if kept is None else kept)
        step_dest = repeated.dest
        dest = step_dest if dest is None else torch.where(dest >= 0, step_dest.gather(1, dest.clamp(min=0)), -1)
        removed, discards = removed + r_step, discards or repeated.discards
    if dest is None:
        return x, track
    rows, tokens = layout.token_index(dest, dest.shape[1] - removed, discards)
    batch = x.shape[0]
    out, size = average_tokens(x, track.size, rows, batch, tokens, discards)
    source = None if track.source is None else sum_tokens(track.source, rows, batch, tokens, discards)
    positions = track.positions
    if kept is not None:
        positions = layout.join(layout.split(positions)[0], kept)
    elif positions is not None:
        positions = average_tokens(positions, track.size, rows, batch, tokens, discards)[0]
    index = _compose(track.index, dest, plan.mode in ("merge", "random_merge"))
    return out, Track(size, index, source, positions)


def _compose(index: Tensor | None, dest: Tensor, never_discards: bool) -> Tensor:
    """The index map ``[G, n0]`` after one layer's group destinations ``dest`` ``[G, n]``: for each input token of
    a group, the token of the group that covers it now (-1: dropped; ``never_discards``: no -1 to keep)."""
    if index is None:
        return dest
    if never_discards:
        return dest.gather(1, index)
    return torch.where(index >= 0, dest.gather(1, index.clamp(min=0)), -1)


def _key(plan: Plan, layer: int, step: int) -> int | None:
    """The random modes' draws for (seed, layer, step) (:func:`vtome.merge.hashed_uniform`); None (the global RNG)
    without a seed."""
    if plan.seed is None or not plan.mode.startswith("random"):
        return None
    return plan.seed * 1_000_003 + layer * 1_009 + step


class Merger:
    """What a patched model holds: its settings, token layout, head count, FLOP model and the last forward's
    record (see the module docstring). Every method but :meth:`record` is a function of its arguments and the
    settings' current plan."""

    def __init__(self, settings: MergeSettings, layout: Layout, num_heads: int, flop_model: FlopModel) -> None:
        self.settings = settings
        self.layout = layout
        self.num_heads = num_heads
        self.flop_model = flop_model
        self.run = RunInfo()
        self._checked: tuple[Plan, int] | None = None  # the plan and clip size last checked for capping

    def bias(self, track: Track, dtype: torch.dtype) -> Tensor | None:
        """Proportional-attention mask ``[B, 1, 1, N]`` (``log(size)``), or None when not needed."""
        if not self.settings.plan.prop_attn or track.size is None:
            return None
        return attention_bias(track.size, dtype)

    def merge(
        self, layer: int, x: Tensor, track: Track, keys: Tensor | None, grouped: bool = False
    ) -> tuple[Tensor, Track]:
        """Merge after ``layer``'s attention (:func:`merge_step`); None ``keys`` or ``r == 0`` keeps every token."""
        plan = self.settings.plan
        if keys is None or plan.r_at(layer) <= 0:
            return x, track
        return merge_step(plan, self.layout, self.num_heads, layer, x, track, keys, grouped)

    def start(self, x: Tensor, positions: Tensor | None = None) -> Track:
        """The track entering the first layer for tokens ``x`` ``[B, N0, C]`` (``positions`` ``[B, N0, k]``
        for position-dependent attention)."""
        source = None
        if self.settings.plan.trace_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=torch.float32).expand(x.shape[0], -1, -1)
        return Track(source=source, positions=positions)

    def record(self, input_tokens: int, tokens_per_layer: list[int], track: Track, batch: int = 0) -> None:
        """Replace :attr:`run` with the record of the forward that just ended (tensors detached); warn about
        layers that were asked to merge more than half their tokens (eager forwards; a budget caps knowingly)."""
        if torch.compiler.is_exporting():
            track = Track()  # traced values, not results
        elif not torch.compiler.is_compiling():
            self._warn_capped(input_tokens)
        track = track.detach()
        ratio = self.flop_model.ratio(input_tokens, tokens_per_layer)
        tokens = tokens_per_layer[-1] if tokens_per_layer else input_tokens
        index = self.layout.global_index(track.index, tokens)
        self.run = RunInfo(input_tokens, tokens_per_layer, track.size, track.source, index, ratio, batch)

    def _warn_capped(self, input_tokens: int) -> None:
        """Warn once per plan and clip size (a diagnostic: it changes nothing the model computes)."""
        plan, layout = self.settings.plan, self.layout
        checked = self._checked
        if checked is not None and checked[0] is plan and checked[1] == input_tokens:
            return
        self._checked = (plan, input_tokens)
        if plan.budgeted or not plan.merges:
            return
        capped: list[tuple[int, int, int]] = []
        simulate_tokens(input_tokens, list(plan.r), layout.protected, layout.frames, self.settings.duplicate, capped)
        unit = " per frame" if layout.frames else ""
        for layer, r, n in capped:
            warnings.warn(
                f"vtome: layer {layer} asked to merge r={r}{unit} but has {n} mergeable tokens{unit}; "
                f"capped at {max_merge(n)} (half of them)",
                CapWarning,
                stacklevel=2,
            )


@dataclass
class Encoded:
    """What :func:`encode` returns: the last layer's tokens ``[B, N, C]`` and their :class:`Track`."""

    hidden_states: Tensor
    track: Track


def encode(
    merger: Merger,
    layers: Iterable[nn.Module],
    hidden_states: Tensor,
    *args: object,
    positions: Tensor | None = None,
    each: Callable[[Tensor, tuple], None] | None = None,
    **kwargs: object,
) -> Encoded:
    """The patched encoder loop: run ``layers`` on ``hidden_states`` ``[B, N0, C]``, carrying the track.

    Each layer is called as ``layer(hidden_states, track, *args, **kwargs)`` and returns
    ``(hidden_states, track, *extra)``; ``each(layer_input, layer_output)`` sees every call (for collecting
    hidden states or attentions). Records the run on ``merger``.
    """
    _check_replay(merger.settings.plan, layers)
    track = merger.start(hidden_states, positions)
    input_tokens, counts = hidden_states.shape[1], []
    for layer in layers:
        out = layer(hidden_states, track, *args, **kwargs)
        if each is not None:
            each(hidden_states, out)
        hidden_states, track = out[0], out[1].detach()
        counts.append(hidden_states.shape[1])
    merger.record(input_tokens, counts, track, hidden_states.shape[0])
    return Encoded(hidden_states, track)


def _check_replay(plan: Plan, layers: Iterable[nn.Module]) -> None:
    """``ValueError`` for an unseeded random mode in a layer that gradient checkpointing recomputes without
    replaying the random state (``preserve_rng_state=False``): the recompute would draw another matching, and
    the gradients would belong to a network that never ran."""
    if plan.seed is not None or not plan.mode.startswith("random") or not torch.is_grad_enabled():
        return
    for layer in layers:
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if not (layer.training and getattr(layer, "gradient_checkpointing", False)):
            continue
        if isinstance(checkpoint, functools.partial) and checkpoint.keywords.get("preserve_rng_state", True) is False:
            raise ValueError(
                f"vtome: mode={plan.mode!r} without a seed under gradient checkpointing with preserve_rng_state=False: "
                "the recomputed layer would draw another matching; pass seed=... to vtome.patch (or set "
                "vtome.settings(model).seed), or keep preserve_rng_state=True"
            )


def pool_mean(tokens: Tensor, size: Tensor | None) -> Tensor:
    """Mean of ``tokens`` ``[B, N, C]`` over tokens, weighted by ``size`` ``[B, N, 1]`` (plain mean if None);
    accumulated in at least float32 (float64 stays float64)."""
    if size is None:
        return tokens.mean(1)
    weighted = tokens.to(torch.promote_types(tokens.dtype, torch.float32)) * size
    return (weighted.sum(1) / size.sum(1)).to(tokens.dtype)

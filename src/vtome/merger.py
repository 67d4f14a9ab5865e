"""The merge step of a patched model, and the values that travel with the tokens through it.

Who owns what, and what travels where:

- A patched model owns one :class:`Merger` (``model._vtome``; its patched submodules point at the same
  object): the settings, the token layout, the head count and ``run``, the record of the last forward.
  Nothing about a forward in progress is stored on it, and it holds no closures, so ``copy.deepcopy`` and
  pickling give an independent patched model.
- A forward carries its merge state as values. The patched encoder loop (:func:`encode`) starts a
  :class:`Track` (sizes, index map, and with ``trace_source`` an identity source map) and passes
  ``(hidden_states, track)`` to each layer as arguments, getting the same back. Inside a layer, the
  attention takes ``Merger.bias(track)`` (proportional attention) and returns its keys with its output; the
  layer hands them to ``Merger.merge(layer, x, track, keys)``, a pure function of its arguments. A
  recomputed layer (gradient checkpointing) therefore sees exactly the inputs of its first run.
- What a model needs after the encoder (VideoMAE's size-weighted mean pooling) comes back from the encoder
  as a return value.
- The one write of a forward: at the end of the loop, :func:`encode` replaces ``Merger.run`` with a new
  :class:`RunInfo` (token counts; sizes, index and sources detached, so no activation outlives the forward).
- Random modes with a seed draw from a generator seeded by (seed, layer, step): a recompute draws the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor
from torch.profiler import record_function

from vtome import kernels
from vtome.flops import stack_flops
from vtome.layout import Layout
from vtome.merge import (
    SUMMED_DTYPES,
    aggregate_heads,
    attention_bias,
    average_tokens,
    bipartite_match,
    max_merge,
    rule,
    sum_tokens,
)
from vtome.settings import MergeSettings

# Profiler range around all matching and merging work (shows the merge steps in a user's profiler trace).
PROFILE_RANGE = "vtome.merge"
_profiler = torch.autograd.profiler


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
    ``flop_ratio``: unpatched / patched transformer FLOPs of this forward (:mod:`vtome.flops`).
    """

    input_tokens: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    size: Tensor | None = None
    source: Tensor | None = None
    index: Tensor | None = None
    flop_ratio: float = 1.0


@dataclass(frozen=True)
class Track:
    """What travels with the tokens ``[B, N, C]`` through the encoder, as an argument and a return value of
    every patched layer (never stored on a module):

    ``size`` ``[B, N, 1]`` float32, input patches each token stands for (None: all ones, nothing merged);
    ``index`` ``[B, N0]`` long, for each input token the current token that covers it, -1 where it was
    dropped (None: the identity); in divided layouts ``[B*T, n0]``, per frame the current slot of each of its
    input slots (a token never leaves its frame; :meth:`Merger.global_index` gives positions);
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


@dataclass(frozen=True)
class _Fusion:
    """What the compiled merge step (:meth:`Merger._fused`) takes from the settings and layout, derived once
    per settings: ``schedule`` is the settings' :meth:`~vtome.settings.MergeSettings.frozen_schedule` they came
    from (a new one means a setting was assigned); ``single``: one matching per group by similarity (not a
    random mode, frames not aligned; a layer with repeated steps takes the general step); ``joint``: a joint layout
    (its group is the sequence); ``heads``: keys the kernel sums over heads (mean aggregation; else 0, the
    metric is built first); ``protected``: protected tokens per group; ``args``: the step's arguments after
    ``r``."""

    schedule: tuple[int, ...]
    single: bool
    joint: bool
    heads: int
    protected: int
    args: tuple


class Merger:
    """The merge step of one patched model: settings, layout and the last forward's record (see the module
    docstring). Every method but :meth:`record` is a function of its arguments and the settings."""

    _fusion_cache: _Fusion | None = None  # constants derived from the settings (see _fusion)

    def __init__(self, settings: MergeSettings, layout: Layout, num_heads: int, attention: str, hidden: int) -> None:
        self.settings = settings
        self.layout = layout
        self.num_heads = num_heads
        self.attention = attention  # "joint", "divided" or "trajectory": which FLOP model applies
        self.hidden = hidden
        self.run = RunInfo()
        self._warned: set[int] = set()  # layers already warned about capping (warn once each)

    def merges(self) -> bool:
        """Whether any layer will merge."""
        return any(self.settings.schedule())

    def metric(self, keys: Tensor) -> Tensor:
        """The matching metric ``[B', N, d]`` from keys (projected ``[B', N, H*d]`` or per head ``[B', H, N, d]``)
        by the settings' head aggregation (matching is by cosine similarity: the sum over heads does as the mean)."""
        return aggregate_heads(keys, self.num_heads, self.settings.head_aggregation, scaled=False)

    def bias(self, track: Track, dtype: torch.dtype) -> Tensor | None:
        """Proportional-attention mask ``[B, 1, 1, N]`` (``log(size)``), or None when not needed."""
        if not self.settings.prop_attn or track.size is None:
            return None
        return attention_bias(track.size, dtype)

    def start(self, x: Tensor, positions: Tensor | None = None) -> Track:
        """The track entering the first layer for tokens ``x`` ``[B, N0, C]`` (``positions`` ``[B, N0, k]``
        for position-dependent attention)."""
        source = None
        if self.settings.trace_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=torch.float32).expand(x.shape[0], -1, -1)
        return Track(source=source, positions=positions)

    def record(self, input_tokens: int, tokens_per_layer: list[int], track: Track) -> None:
        """Replace :attr:`run` with the record of the forward that just ended (tensors detached)."""
        if torch.compiler.is_exporting():
            track = Track()  # traced values, not results
        track = track.detach()
        frames, kind = self.layout.frames, self.attention
        full = stack_flops(input_tokens, [input_tokens] * len(tokens_per_layer), self.hidden, frames, kind)
        ratio = full / stack_flops(input_tokens, tokens_per_layer, self.hidden, frames, kind)
        index = self.global_index(track.index, tokens_per_layer[-1] if tokens_per_layer else input_tokens)
        self.run = RunInfo(input_tokens, tokens_per_layer, track.size, track.source, index, ratio)

    # -- the merge step ----------------------------------------------------------------------------
    def merge(
        self, layer: int, x: Tensor, track: Track, keys: Tensor | None, grouped: bool = False
    ) -> tuple[Tensor, Track]:
        """Merge after ``layer``'s attention: tokens ``x`` ``[B, N, C]`` and their :class:`Track` -> the same
        with ``N'`` tokens, matched on the attention's ``keys``.

        ``keys`` are projected ``[B, N, H*d]`` or per head ``[B, H, N, d]`` in model token order, or with
        ``grouped`` already in group layout (``[G, n, H*d]`` or ``[G, H, n, d]``: a divided model's per-frame
        keys); None (or ``r == 0``) keeps every token.
        """
        # (this runs at every layer of every forward: at batch 1 on a small model, each lookup counts)
        schedule = self.settings.frozen_schedule()
        r = schedule[layer] if layer < len(schedule) else 0  # MergeSettings.r_at, on the schedule in hand
        if r <= 0 or keys is None:
            return x, track
        if _profiler._is_profiler_enabled:  # a range in the user's trace (it costs a dispatch)
            with record_function(PROFILE_RANGE):
                return self._step(layer, x, track, keys, grouped, r, schedule)
        return self._step(layer, x, track, keys, grouped, r, schedule)

    def _step(
        self, layer: int, x: Tensor, track: Track, keys: Tensor, grouped: bool, r: int, schedule: tuple[int, ...]
    ) -> tuple[Tensor, Track]:
        if keys.requires_grad:  # matching needs no gradient
            keys = keys.detach()
        size = track.size
        if track.positions is None and track.source is None and (size is None or size.dtype == torch.float32):
            compiled = kernels.ops(x, keys, size)  # None where the kernels do not apply
            if compiled is not None:
                fusion = self._fusion_cache
                if fusion is None or fusion.schedule is not schedule:
                    fusion = self._fusion(schedule)
                if fusion.single and not self.settings.duplicate.get(layer):  # (read live: a dict can change in place)
                    return self._fused(compiled, fusion, layer, x, track, keys, grouped, r)
        metric = self.metric(keys)
        if not (grouped or self.layout.frames is None):  # a joint layout's group is the sequence
            metric = self.layout.split(metric)[1]
        return self._merge(layer, x, track, metric, r)

    def _merge(self, layer: int, x: Tensor, track: Track, metric: Tensor, r: int) -> tuple[Tensor, Track]:
        layout, s = self.layout, self.settings
        frames = layout.frames if layout.frames is not None and s.divided == "aligned" else 1
        if frames > 1:  # one matching per clip, on the keys averaged over its frames
            metric = metric.unflatten(0, (-1, frames)).mean(1)
        p, steps = layout.group_protected, 1 + s.duplicate.get(layer, 0)
        dest, removed, discards = None, 0, False
        group_size = kept = None  # sizes in group layout (repeated steps) and positions kept in place
        for step in range(steps):
            n = metric.shape[1] - p
            r_step = self._cap(layer, r, n) if step == 0 else min(r, max_merge(n))
            if r_step == 0:
                break
            match = bipartite_match(
                metric,
                r_step,
                protected=p,
                mode=s.mode,
                threshold=s.threshold,
                order=s.order,
                generator=self._rng(x, layer, step),
            )
            repeated = match.repeat(frames)
            if step + 1 < steps:  # a repeated step matches on the merged keys
                if group_size is None:
                    group_size = (
                        layout.split(track.size)[1]
                        if track.size is not None
                        else torch.ones(*repeated.dest.shape, 1, device=x.device, dtype=torch.float32)
                    )
                metric = match.average(metric, group_size.unflatten(0, (-1, frames)).mean(1))[0]
                group_size = repeated(group_size)
            if track.positions is not None and s.position_merge == "destination":
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
        return out, Track(size, self._update_index(track.index, dest), source, positions)

    def _fusion(self, schedule: tuple[int, ...]) -> _Fusion:
        """The compiled step's constants for the settings whose :meth:`~MergeSettings.frozen_schedule` is
        ``schedule`` (kept until a setting is assigned)."""
        s, layout = self.settings, self.layout
        p = layout.group_protected
        self._fusion_cache = _Fusion(
            schedule,
            single=not s.mode.startswith("random") and s.divided != "aligned",
            joint=layout.frames is None,
            heads=self.num_heads if s.head_aggregation == "mean" else 0,
            protected=p,
            args=(p, *rule(p, s.mode, s.order), s.threshold, layout.frames or 0, layout.protected, layout.time_minor),
        )
        return self._fusion_cache

    def _fused(
        self,
        compiled: kernels.Ops,
        fusion: _Fusion,
        layer: int,
        x: Tensor,
        track: Track,
        keys: Tensor,
        grouped: bool,
        r: int,
    ) -> tuple[Tensor, Track]:
        """:meth:`_merge` as one compiled call, the same result to the bit. The kernel sums the keys over heads
        itself (in head order, as :func:`vtome.merge.aggregate_heads` does) when they are float32/64 in group
        layout and heads are averaged; else it takes the metric ``[G, n, d]``."""
        in_groups = grouped or fusion.joint
        heads = fusion.heads if in_groups and keys.dtype in SUMMED_DTYPES else 0
        if not heads:
            keys = self.metric(keys)
            if not in_groups:
                keys = self.layout.split(keys)[1]
        n = keys.size(-2) - fusion.protected  # tokens of a group: [G, n, C] or [G, H, n, d]
        if r > max_merge(n):
            r = self._cap(layer, r, n)
        if r == 0:
            return x, track
        out, size, index = compiled.step(keys, heads, x, track.size, track.index, r, *fusion.args)
        return out, Track(size, index)

    def _update_index(self, index: Tensor | None, dest: Tensor) -> Tensor:
        """Compose the index map ``[G, n0]`` with one layer's group destinations ``dest`` ``[G, n]``: for each
        input token of a group, the token of the group that covers it now (-1: dropped). Joint layouts have
        one group per clip (the whole sequence); divided layouts one per frame (a token never leaves its
        frame, the set-aside class token is not in it): :meth:`global_index` turns it into positions."""
        if index is None:
            return dest
        if self.settings.mode in ("merge", "random_merge"):  # nothing is ever discarded: no -1 to keep
            return dest.gather(1, index)
        return torch.where(index >= 0, dest.gather(1, index.clamp(min=0)), -1)

    def global_index(self, index: Tensor | None, tokens: int) -> Tensor | None:
        """The index map as positions in the current sequence of ``tokens`` tokens: ``[B, N0]``, -1 dropped."""
        if index is None or self.layout.frames is None:
            return index
        p, frames = self.layout.protected, self.layout.frames
        position = self.layout.frame_positions(index, (tokens - p) // frames, missing=-1)
        head = torch.arange(p, device=index.device).expand(position.shape[0], p)
        return torch.cat([head, position], dim=1)

    def _cap(self, layer: int, r: int, n: int) -> int:
        """``r`` capped at half of ``n`` mergeable tokens, warning once per layer when it is."""
        cap = max_merge(n)
        if r > cap and layer not in self._warned and self.settings.flops is None:  # a budget caps knowingly
            self._warned.add(layer)
            unit = " per frame" if self.layout.frames else ""
            warnings.warn(
                f"vtome: layer {layer} asked to merge r={r}{unit} but has {n} mergeable tokens{unit}; "
                f"capped at {cap} (half of them)",
                CapWarning,
                stacklevel=4,
            )
        return min(r, cap)

    def _rng(self, x: Tensor, layer: int, step: int) -> torch.Generator | None:
        """A generator seeded by (seed, layer, step) for the random modes; None (global RNG) without a seed."""
        seed = self.settings.seed
        if seed is None or not self.settings.mode.startswith("random"):
            return None
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed * 1_000_003 + layer * 1_009 + step)
        return generator


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
    track = merger.start(hidden_states, positions)
    input_tokens, counts = hidden_states.shape[1], []
    for layer in layers:
        out = layer(hidden_states, track, *args, **kwargs)
        if each is not None:
            each(hidden_states, out)
        hidden_states, track = out[0], out[1].detach()
        counts.append(hidden_states.shape[1])
    merger.record(input_tokens, counts, track)
    return Encoded(hidden_states, track)


def pool_mean(tokens: Tensor, size: Tensor | None) -> Tensor:
    """Mean of ``tokens`` ``[B, N, C]`` over tokens, weighted by ``size`` ``[B, N, 1]`` (plain mean if None)."""
    if size is None:
        return tokens.mean(1)
    return ((tokens.float() * size).sum(1) / size.sum(1)).to(tokens.dtype)

"""Merge settings (validated), token layouts, and the per-forward state shared by a patched model's layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.profiler import record_function

from vtome.merge import (
    HEAD_AGGREGATIONS,
    MODES,
    aggregate_heads,
    attention_bias,
    bipartite_match,
    max_merge,
    merge_tokens,
    parse_schedule,
)

# Profiler range around all matching and merging work (the benchmark reads it to report the overhead).
PROFILE_RANGE = "vtome.merge"


class CapWarning(UserWarning):
    """A layer was asked to merge more than half of its mergeable tokens and was capped."""


RSetting = int | tuple[int, float] | list[int]


def _check_r(r: object, num_layers: int) -> RSetting:
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    allowed = (
        "r must be an int >= 0 (tokens removed per layer), an (r, inflection) tuple with inflection in "
        f"[-1, 1], or a list of {num_layers} ints >= 0 (one per layer)"
    )
    if is_int(r):
        if r < 0:
            raise ValueError(f"{allowed}; got r={r}")
        return r
    if isinstance(r, tuple):
        if len(r) != 2 or not is_int(r[0]) or r[0] < 0 or not isinstance(r[1], (int, float)):
            raise ValueError(f"{allowed}; got r={r!r}")
        if not -1.0 <= float(r[1]) <= 1.0:
            raise ValueError(f"{allowed}; got inflection {r[1]}")
        return (r[0], float(r[1]))
    if isinstance(r, list):
        if len(r) != num_layers or not all(is_int(v) and v >= 0 for v in r):
            raise ValueError(f"{allowed}; got a list of {len(r)} values: {r!r}")
        return list(r)
    raise ValueError(f"{allowed}; got {type(r).__name__} {r!r}")


@dataclass
class MergeSettings:
    """What a patched model does; attributes may be changed at any time and are validated on assignment.

    ``r`` counts tokens removed per layer: per clip for joint space-time models, per frame for divided
    space-time models. ``prop_attn=None`` means the model family's default.
    """

    num_layers: int
    r: RSetting = 0
    mode: str = "merge"
    prop_attn: bool = True
    head_aggregation: str = "mean"
    threshold: float = 0.0
    start_layer: int = 0
    trace_source: bool = False
    seed: int | None = None
    duplicate: dict[int, int] = field(default_factory=dict)
    layers: list[int] | None = None

    def __setattr__(self, name: str, value: object) -> None:
        value = self._validate(name, value)
        super().__setattr__(name, value)

    def _validate(self, name: str, value: object) -> object:
        if name == "r":
            return _check_r(value, self.num_layers)
        if name == "mode" and value not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {value!r}")
        if name == "head_aggregation" and value not in HEAD_AGGREGATIONS:
            raise ValueError(f"head_aggregation must be one of {', '.join(HEAD_AGGREGATIONS)}; got {value!r}")
        if name == "threshold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ValueError(f"threshold is a cosine similarity and must be a number in [-1, 1]; got {value!r}")
            return float(value)
        if name == "start_layer" and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.num_layers
        ):
            raise ValueError(f"start_layer must be an int in [0, {self.num_layers}]; got {value!r}")
        if name in ("prop_attn", "trace_source") and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
        if name == "layers" and value is not None:
            if not isinstance(value, (list, tuple, set)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in value
            ):
                raise ValueError(f"layers must list layer indices in [0, {self.num_layers - 1}]; got {value!r}")
            return sorted(set(value))
        if name == "duplicate":
            if value is None:
                return {}
            if not isinstance(value, dict) or not all(
                isinstance(k, int) and 0 <= k < self.num_layers and isinstance(v, int) and v >= 0
                for k, v in value.items()
            ):
                raise ValueError(
                    f"duplicate maps layer index (0..{self.num_layers - 1}) -> extra merge steps (int >= 0); "
                    f"got {value!r}"
                )
            return dict(value)
        if name == "seed" and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"seed must be an int or None; got {value!r}")
        return value

    def schedule(self) -> list[int]:
        """``r`` for each layer, before capping (0 outside ``layers`` and before ``start_layer``)."""
        values = parse_schedule(self.r, self.num_layers, self.start_layer)
        return values if self.layers is None else [v if i in self.layers else 0 for i, v in enumerate(values)]


@dataclass(frozen=True)
class Layout:
    """Where the mergeable groups sit in a model's token sequence ``[B, N, D]``.

    ``protected`` leading tokens (a class token) are never merged. With ``frames=None`` (joint
    space-time) the whole clip is one group and the matching skips the protected tokens; with
    ``frames=T`` (divided space-time) each frame is a group, the protected tokens are set aside, and the
    frame tokens are stored time-minor (``index = p + slot*T + t``, TimeSformer) or time-major
    (``index = p + t*n + slot``).
    """

    protected: int = 0
    frames: int | None = None
    time_minor: bool = True

    @property
    def group_protected(self) -> int:
        """Protected tokens at the start of each group (joint layouts keep them in the group)."""
        return self.protected if self.frames is None else 0

    def split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, N, D]`` -> set-aside tokens ``[B, p, D]`` and groups ``[G, n, D]`` (views where possible)."""
        if self.frames is None:
            return t[:, :0], t
        head, body = t[:, : self.protected], t[:, self.protected :]
        b, m, d = body.shape
        f = self.frames
        if self.time_minor:
            body = body.reshape(b, m // f, f, d).transpose(1, 2)
        return head, body.reshape(b * f, m // f, d)

    def join(self, head: Tensor, groups: Tensor) -> Tensor:
        """Inverse of :meth:`split` for any group length."""
        if self.frames is None:
            return groups
        g, n, d = groups.shape
        b, f = g // self.frames, self.frames
        groups = groups.reshape(b, f, n, d)
        groups = (groups.transpose(1, 2) if self.time_minor else groups).reshape(b, n * f, d)
        return torch.cat([head, groups], dim=1)


@dataclass
class RunInfo:
    """What the last forward of a patched model did.

    ``input_tokens``: tokens entering the first layer; ``tokens_per_layer``: tokens leaving each layer after
    its merge (class token included, whole clip);
    ``size``: ``[B, N, 1]`` input patches each output token stands for (None if nothing was merged);
    ``source``: ``[B, N, N0]`` which input tokens each output token covers (with ``trace_source=True``).
    """

    input_tokens: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    size: Tensor | None = None
    source: Tensor | None = None


class MergeState:
    """Shared by the layers of one patched model: settings, plus what the current forward has merged."""

    def __init__(self, settings: MergeSettings, layout: Layout, num_heads: int) -> None:
        self.settings = settings
        self.layout = layout
        self.num_heads = num_heads
        self.run = RunInfo()
        self.metric: Tensor | None = None
        self.last_hidden: Tensor | None = None
        self._schedule: list[int] = []
        self._bias: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._warned: set[int] = set()

    # -- forward lifecycle -------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a forward pass: forget the last one and resolve this one's schedule."""
        self.run = RunInfo()
        self.metric = None
        self.last_hidden = None
        self._bias = None
        self._generator = None
        self._schedule = self.settings.schedule()

    def r_at(self, layer: int) -> int:
        """Requested (uncapped) ``r`` for ``layer``."""
        return self._schedule[layer] if layer < len(self._schedule) else 0

    def capture_keys(self, layer: int, keys: Tensor) -> None:
        """Record the metric of ``layer`` from its projected keys ``[G, N, H*d]``, if that layer merges."""
        if self.r_at(layer) > 0:
            with record_function(PROFILE_RANGE):
                self.metric = aggregate_heads(keys.detach(), self.num_heads, self.settings.head_aggregation)

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Proportional-attention mask ``[B, 1, 1, N]`` for the current tokens, or None when not needed."""
        if not self.settings.prop_attn or self.run.size is None:
            return None
        if self._bias is None or self._bias.dtype != dtype:
            self._bias = attention_bias(self.run.size, dtype)
        return self._bias

    # -- the merge step ----------------------------------------------------------------------------
    def merge(self, layer: int, x: Tensor, metric: Tensor | None = None) -> Tensor:
        """Merge ``x`` ``[B, N, C]`` after ``layer``'s attention; returns ``[B, N', C]``.

        ``metric`` is in group layout ``[G, n, c]``; by default the one captured from the keys, split
        with the layout.
        """
        if layer == 0:
            self.run.input_tokens = x.shape[1]
        r = self.r_at(layer)
        if r > 0:
            with record_function(PROFILE_RANGE):
                x = self._merge(layer, x, r, metric)
        self.run.tokens_per_layer.append(x.shape[1])
        return x

    def _merge(self, layer: int, x: Tensor, r: int, metric: Tensor | None) -> Tensor:
        layout, s = self.layout, self.settings
        if metric is None:
            if self.metric is None:
                raise RuntimeError(f"vtome: no attention keys were captured for layer {layer}")
            metric = layout.split(self.metric)[1]
        self.metric = None
        p = layout.group_protected
        source = self.run.source
        if s.trace_source and source is None:
            source = torch.eye(x.shape[1], device=x.device, dtype=torch.float32).expand(x.shape[0], -1, -1)
        x_head, x_body = layout.split(x)
        s_head, s_body = layout.split(self.run.size) if self.run.size is not None else (None, None)
        src_head, src_body = layout.split(source) if source is not None else (None, None)
        steps = 1 + s.duplicate.get(layer, 0)
        for step in range(steps):
            n = metric.shape[1] - p
            r_step = self._cap(layer, r, n) if step == 0 else min(r, max_merge(n))
            if r_step == 0:
                break
            merge = bipartite_match(
                metric, r_step, protected=p, mode=s.mode, threshold=s.threshold, generator=self._rng(x)
            )
            if step + 1 < steps:  # a repeated step matches on the merged keys
                metric = merge.average(metric, s_body)[0]
            x_body, s_body, src_body = merge_tokens(merge, x_body, s_body, src_body)
        if s_body is None:
            return x
        if s_head is None:  # first merge: the set-aside tokens have size 1
            s_head = s_body.new_ones(x_head.shape[0], x_head.shape[1], 1)
        self.run.size = layout.join(s_head, s_body)
        if source is not None:
            self.run.source = layout.join(src_head, src_body)
        self._bias = None
        return layout.join(x_head, x_body)

    def _cap(self, layer: int, r: int, n: int) -> int:
        """``r`` capped at half of ``n`` mergeable tokens, warning once per layer when it is."""
        cap = max_merge(n)
        if r > cap and layer not in self._warned:
            self._warned.add(layer)
            unit = " per frame" if self.layout.frames else ""
            warnings.warn(
                f"vtome: layer {layer} asked to merge r={r}{unit} but has {n} mergeable tokens{unit}; "
                f"capped at {cap} (half of them)",
                CapWarning,
                stacklevel=3,
            )
        return min(r, cap)

    def _rng(self, x: Tensor) -> torch.Generator | None:
        seed = self.settings.seed
        if seed is None or not self.settings.mode.startswith("random"):
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=x.device)
            self._generator.manual_seed(seed)
        return self._generator


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

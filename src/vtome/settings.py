"""Merge settings as values, and the per-layer plan derived from them.

Owns: :class:`MergeSettings` (what a patched model does: every field validated on assignment and stored as
an immutable value, so an in-place edit is impossible) and :class:`Plan` (what each layer's merge step does,
rebuilt from the settings at every assignment, so it can never disagree with what the settings show).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from vtome.merge import HEAD_AGGREGATIONS, MODES, ORDERS, parse_schedule

DIVIDED: tuple[str, ...] = ("per_frame", "aligned")
POSITION_MERGES: tuple[str, ...] = ("mean", "destination")


class Inflection(NamedTuple):
    """An ``r`` schedule rising (or falling) linearly over the layers and averaging ``r`` (see
    :func:`vtome.merge.parse_schedule`); ``inflection`` in [-1, 1] (0: constant)."""

    r: int
    inflection: float


RSetting = int | tuple[int, float] | tuple[int, ...] | list[int]


class FrozenDict(dict):
    """A read-only ``dict`` (``duplicate``): reads, equality, JSON and ``dataclasses.asdict`` as a dict;
    every in-place change raises ``TypeError``. Pickles and copies as a new one."""

    def __new__(cls, *args: object, **kwargs: object) -> FrozenDict:
        self = super().__new__(cls)
        dict.__init__(self, *args, **kwargs)  # filled here, once: __init__ cannot refill it later
        return self

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "merge settings are values and cannot be changed in place; assign a new one instead, e.g. "
            "vtome.settings(model).duplicate = {1: 2}"
        )

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __repr__(self) -> str:
        return repr(dict(self))


def _is_int(v: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_r(r: object, num_layers: int) -> int | Inflection | tuple[int, ...]:
    """``r`` as stored: an int; an :class:`Inflection` (two values, the second a float: ``(8, 0.5)``,
    ``[8, -1.0]``); or a tuple of one int per layer (a list or tuple of ints)."""
    allowed = (
        "r must be an int >= 0 (tokens removed per layer), an (r, inflection) pair with inflection a float in "
        f"[-1, 1] such as (8, 0.5), or a list of {num_layers} ints >= 0 (one per layer)"
    )
    if _is_int(r):
        if r < 0:
            raise ValueError(f"{allowed}; got r={r}")
        return int(r)
    if not isinstance(r, (list, tuple)):
        raise ValueError(f"{allowed}; got {type(r).__name__} {r!r}")
    if isinstance(r, Inflection) or (len(r) == 2 and isinstance(r[1], numbers.Real) and not _is_int(r[1])):
        if not _is_int(r[0]) or r[0] < 0 or not -1.0 <= float(r[1]) <= 1.0:
            raise ValueError(f"{allowed}; got r={r!r} (inflection must be in [-1, 1])")
        return Inflection(int(r[0]), float(r[1]))
    if len(r) != num_layers or not all(_is_int(v) and v >= 0 for v in r):
        raise ValueError(f"{allowed}; got a list of {len(r)} values: {list(r)!r}")
    return tuple(int(v) for v in r)


def _choice(name: str, value: object, choices: tuple[str, ...], meaning: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}{meaning}; got {value!r}")
    return value


class SettingError(AttributeError, ValueError):
    """A name that is not a setting, or a fact that cannot be assigned (both an AttributeError, as Python
    reports unknown attributes, and a ValueError, as vtome reports bad settings)."""


@dataclass(frozen=True)
class Plan:
    """What each layer's merge step does: derived from :class:`MergeSettings` alone, as a value.

    ``r[i]`` tokens removed per step in layer ``i`` (per clip for joint layouts, per frame for divided ones;
    0: no merge there), ``steps[i]`` merge steps in layer ``i`` (1 + ``duplicate``); the other fields are the
    settings the step reads, with ``aligned`` for ``divided="aligned"``.
    """

    r: tuple[int, ...]
    steps: tuple[int, ...]
    mode: str
    threshold: float
    order: str
    head_aggregation: str
    prop_attn: bool
    seed: int | None
    aligned: bool
    position_merge: str | None
    trace_source: bool
    budgeted: bool  # r was resolved from a FLOP budget (capping is then expected, not warned about)

    @property
    def merges(self) -> bool:
        """Whether any layer merges."""
        return any(self.r)

    def r_at(self, layer: int) -> int:
        """``r`` of ``layer`` (0 past the last layer)."""
        return self.r[layer] if 0 <= layer < len(self.r) else 0


# Settings whose change changes the schedule, so a FLOP budget no longer describes it.
_SCHEDULE = ("r", "start_layer", "layers", "duplicate")


@dataclass
class MergeSettings:
    """What a patched model does. Every field is validated when assigned and stored as an immutable value
    (``r`` per layer and ``layers`` as tuples, ``duplicate`` as a read-only mapping), so the only way to change
    a setting is to assign it, and an assignment takes effect at the next forward. ``num_layers`` is a fact of
    the model and cannot be assigned; so is ``flops`` (call ``vtome.patch(model, flops=...)`` for a new budget;
    assigning ``r``, ``start_layer``, ``layers`` or ``duplicate`` clears it). Unknown names are refused.

    ``r`` counts tokens removed per layer: per clip for joint space-time models, per frame for divided
    space-time models.
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
    layers: tuple[int, ...] | None = None
    order: str = "paper"
    divided: str | None = None  # divided space-time models only: "per_frame" or "aligned"
    position_merge: str | None = None  # models with rotary positions (V-JEPA 2) only: "mean" or "destination"
    flops: float | None = None  # the FLOP budget r was resolved from (vtome.patch(model, flops=...)), if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "_plan", self._build_plan())

    def __setattr__(self, name: str, value: object) -> None:
        ready = "_plan" in self.__dict__  # False while __init__ assigns the fields
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS - {"num_layers"}))
            raise SettingError(f"MergeSettings has no setting {name!r}; the settings are: {known}")
        if ready and name == "num_layers":
            raise SettingError("num_layers is a fact of the patched model and cannot be assigned")
        if ready and name == "flops" and value != self.flops:
            raise SettingError(
                "flops is the FLOP budget r was resolved from: a FLOP budget is resolved to r when patching, so call "
                "vtome.patch(model, flops=...) again (or assign r directly)"
            )
        object.__setattr__(self, name, self._validate(name, value))
        if ready:
            if name in _SCHEDULE:
                object.__setattr__(self, "flops", None)
            object.__setattr__(self, "_plan", self._build_plan())

    def __delattr__(self, name: str) -> None:
        raise SettingError(f"merge settings cannot be deleted; assign {name} a new value instead")

    @property
    def plan(self) -> Plan:
        """What each layer's merge step does under these settings (rebuilt at every assignment)."""
        return self.__dict__["_plan"]

    def schedule(self) -> list[int]:
        """``r`` for each layer, before capping (0 outside ``layers`` and before ``start_layer``)."""
        return list(self.plan.r)

    def to_dict(self) -> dict:
        """Every field as plain JSON-ready values (tuples as lists, ``duplicate`` as a dict); assigning them back
        gives the same settings (an inflection stays a float, so ``[8, 0.5]`` reads as ``(r, inflection)``)."""
        out = dataclasses.asdict(self)
        out["r"] = list(self.r) if isinstance(self.r, tuple) else self.r
        out["duplicate"] = dict(self.duplicate)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    def _build_plan(self) -> Plan:
        per_layer = isinstance(self.r, tuple) and not isinstance(self.r, Inflection)
        r = list(self.r) if per_layer else self.r  # parse_schedule: a list per layer, a tuple (r, inflection)
        values = parse_schedule(r, self.num_layers, self.start_layer)
        if self.layers is not None:
            values = [v if i in self.layers else 0 for i, v in enumerate(values)]
        steps = tuple((1 + self.duplicate.get(i, 0)) if v > 0 else 0 for i, v in enumerate(values))
        return Plan(
            r=tuple(values),
            steps=steps,
            mode=self.mode,
            threshold=self.threshold,
            order=self.order,
            head_aggregation=self.head_aggregation,
            prop_attn=self.prop_attn,
            seed=self.seed,
            aligned=self.divided == "aligned",
            position_merge=self.position_merge,
            trace_source=self.trace_source,
            budgeted=self.flops is not None,
        )

    def _specific(self, name: str, value: object, choices: tuple[str, ...], meaning: str, applies: str) -> str | None:
        """A setting only some models have (None on the others, fixed when the settings are made): one of
        ``choices``, or None where it does not apply."""
        if name not in self.__dict__:  # being made: None says this model has no such setting
            return None if value is None else _choice(name, value, choices, meaning)
        if self.__dict__[name] is None:
            if value is None:
                return None
            raise ValueError(f"{name} applies to {applies}")
        return _choice(name, value, choices, meaning)

    def _validate(self, name: str, value: object) -> object:
        n = self.__dict__.get("num_layers")
        if name == "num_layers":
            if not _is_int(value) or value < 1:
                raise ValueError(f"num_layers must be an int >= 1; got {value!r}")
            return value
        if name == "r":
            return _check_r(value, n)
        if name == "mode":
            return _choice("mode", value, MODES)
        if name == "order":
            return _choice(
                "order",
                value,
                ORDERS,
                " ('paper': the published A/B split and token order; 'spatial': tokens kept in their original order)",
            )
        if name == "head_aggregation":
            return _choice("head_aggregation", value, HEAD_AGGREGATIONS)
        if name == "position_merge":
            return self._specific(
                name,
                value,
                POSITION_MERGES,
                " ('mean': a merged token sits at the size-weighted mean position of its patches; 'destination': "
                "at its destination token's position)",
                "models with rotary positions (V-JEPA 2) only; this model's attention does not depend on token "
                "positions",
            )
        if name == "divided":
            return self._specific(
                name,
                value,
                DIVIDED,
                " ('per_frame': each frame picks its own pairs, as published; 'aligned': one matching per clip, "
                "shared by all its frames)",
                "divided space-time models (TimeSformer, Motionformer) only; this model attends jointly over the clip",
            )
        if name == "threshold":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -1.0 <= value <= 1.0:
                raise ValueError(f"threshold is a cosine similarity and must be a number in [-1, 1]; got {value!r}")
            return float(value)
        if name == "start_layer":
            if not _is_int(value) or not 0 <= value <= n:
                raise ValueError(f"start_layer must be an int in [0, {n}]; got {value!r}")
            return int(value)
        if name in ("prop_attn", "trace_source"):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")
            return value
        if name == "layers":
            if value is None:
                return None
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"layers must list layer indices in [0, {n - 1}]; got {value!r}")
            value = list(value)
            if not all(_is_int(i) and 0 <= i < n for i in value):
                raise ValueError(f"layers must list layer indices in [0, {n - 1}]; got {value!r}")
            return tuple(sorted({int(i) for i in value}))
        if name == "duplicate":
            if value is None:
                return FrozenDict()
            if not isinstance(value, dict) or not all(
                _is_int(k) and 0 <= k < n and _is_int(v) and v >= 0 for k, v in value.items()
            ):
                raise ValueError(
                    f"duplicate maps layer index (an int, 0..{n - 1}) -> extra merge steps (an int >= 0); got {value!r}"
                )
            return FrozenDict({int(k): int(v) for k, v in value.items()})
        if name == "seed":
            if value is not None and not _is_int(value):
                raise ValueError(f"seed must be an int or None; got {value!r}")
            return None if value is None else int(value)
        if name == "flops":
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
                raise ValueError(
                    "flops is the fraction of the unpatched FLOPs to keep, a number in (0, 1] (0.5: half); "
                    f"got {value!r}"
                )
            return float(value)
        raise AssertionError(name)  # every field is handled above


_FIELDS = frozenset(f.name for f in dataclasses.fields(MergeSettings))

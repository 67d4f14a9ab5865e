"""Merge settings: what a patched model does, validated on every assignment."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtome.merge import HEAD_AGGREGATIONS, MODES, ORDERS, parse_schedule

RSetting = int | tuple[int, float] | list[int]
DIVIDED: tuple[str, ...] = ("per_frame", "aligned")


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
    order: str = "paper"
    divided: str | None = None  # divided space-time models only: "per_frame" or "aligned"
    position_merge: str = "mean"  # models with positional attention (RoPE): "mean" or "destination"
    flops: float | None = None  # the FLOP budget r was resolved from (vtome.patch(model, flops=...)), if any

    def __setattr__(self, name: str, value: object) -> None:
        value = self._validate(name, value)
        super().__setattr__(name, value)
        self.__dict__.pop("_schedule", None)  # recomputed on next use

    def _validate(self, name: str, value: object) -> object:
        if name == "r":
            return _check_r(value, self.num_layers)
        if name == "mode" and value not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {value!r}")
        if name == "order" and value not in ORDERS:
            raise ValueError(
                f"order must be 'paper' (the published A/B split and token order) or 'spatial' (tokens kept in "
                f"their original order); got {value!r}"
            )
        if name == "divided":
            joint = "divided" in self.__dict__ and self.__dict__["divided"] is None
            if joint and value is not None:
                raise ValueError(
                    "divided applies to divided space-time models (TimeSformer, Motionformer) only; "
                    "this model attends jointly over the clip"
                )
            if not joint and "divided" in self.__dict__ and value not in DIVIDED or value not in (None, *DIVIDED):
                raise ValueError(
                    "divided must be 'per_frame' (each frame picks its own pairs, as published) or 'aligned' "
                    f"(one matching per clip, shared by all its frames); got {value!r}"
                )
        if name == "flops" and "flops" in self.__dict__ and self.__dict__["flops"] != value:
            raise ValueError(
                "a FLOP budget is resolved to r when patching: call vtome.patch(model, flops=...) again "
                "(or set r directly)"
            )
        if name == "position_merge" and value not in ("mean", "destination"):
            raise ValueError(
                "position_merge must be 'mean' (a merged token sits at the size-weighted mean position of the "
                f"patches it covers) or 'destination' (at its destination token's position); got {value!r}"
            )
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
        return list(self.frozen_schedule())

    def r_at(self, layer: int) -> int:
        """``r`` for ``layer`` (as in :meth:`schedule`; 0 past the last layer)."""
        schedule = self.frozen_schedule()
        return schedule[layer] if layer < len(schedule) else 0

    def frozen_schedule(self) -> tuple[int, ...]:
        """:meth:`schedule` as a tuple, cached: the same object until a setting is assigned, a new one after
        (so it also tells whether values derived from the settings are still current)."""
        cached = self.__dict__.get("_schedule")
        if cached is None:
            values = parse_schedule(self.r, self.num_layers, self.start_layer)
            if self.layers is not None:
                values = [v if i in self.layers else 0 for i, v in enumerate(values)]
            cached = tuple(values)
            self.__dict__["_schedule"] = cached
        return cached

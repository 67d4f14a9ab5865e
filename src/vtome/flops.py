"""FLOP model of a transformer stack from the tokens each layer sees (the upper bound on speedup).

Per layer with ``n`` tokens entering and ``m`` leaving (merge after attention, before the MLP) and hidden
size ``C`` (one multiply-add = 2 FLOPs):

- joint space-time attention: ``8nC^2`` (q, k, v, output projections) + ``4n^2C`` (the two attention
  matmuls); MLP ``16mC^2``;
- divided space-time (TimeSformer, ``n = 1 + sT`` for ``s`` slots x ``T`` frames): temporal attention
  ``8sTC^2 + 4sT^2C`` plus its extra projection ``2sTC^2``; spatial attention per frame with the class
  token ``8T(1+s)C^2 + 4T(1+s)^2C``; MLP ``16mC^2``;
- trajectory attention (Motionformer, ``n = 1 + S`` with ``S = F x P``): q, k, v and output projections
  ``8nC^2``, class token ``4nC``, per-frame spatial step ``4S^2C``, query projection ``2SC^2``, key/value
  projection of the ``S x F`` trajectory points ``4SFC^2``, temporal step ``4SFC``; MLP ``16mC^2``.
- an attentive pooler after the last layer (V-JEPA 2's classifier; ``pooler=3`` for 3 self-attention
  layers), on the ``m`` tokens leaving the last layer: each self-attention layer costs a joint
  layer on ``m`` tokens (``24mC^2 + 4m^2C``); then one query cross-attends: its query projection ``2C^2``,
  key and value projections ``4mC^2``, attention ``4mC``, MLP on the query ``16C^2``.

V-JEPA 2's rotary position embedding is elementwise work, like softmax and the layer norms.

Embedding, head, layer norms, softmax and the matching itself are left out: they are small, and the
ratio of two such counts is the speedup a perfect implementation would get.

This module owns the FLOP arithmetic: :class:`FlopModel` (a model's FLOP model, as a value) is the one place
that computes FLOP ratios; :func:`simulate_tokens` predicts token counts; :func:`resolve_budget` turns a
budget into ``r``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

ATTENTIONS: tuple[str, ...] = ("joint", "divided", "trajectory")


def layer_flops(n: int, m: int, hidden: int, frames: int | None = None, attention: str | None = None) -> float:
    """FLOPs of one layer: ``n`` tokens in, ``m`` out. ``attention`` is ``joint`` (default), ``divided``
    (the default when ``frames`` is given) or ``trajectory``; ``frames`` is the token grid's frame count."""
    c = hidden
    attention = attention or ("joint" if frames is None else "divided")
    if attention == "joint":
        cost = 8 * n * c * c + 4 * n * n * c
    elif attention == "divided":
        t = frames
        s = (n - 1) // t
        temporal = 8 * s * t * c * c + 4 * s * t * t * c + 2 * s * t * c * c
        spatial = 8 * t * (1 + s) * c * c + 4 * t * (1 + s) ** 2 * c
        cost = temporal + spatial
    elif attention == "trajectory":
        f, s = frames, n - 1
        cost = 8 * n * c * c + 4 * n * c + 4 * s * s * c + 2 * s * c * c + 4 * s * f * c * c + 4 * s * f * c
    else:
        raise ValueError(f"attention must be joint, divided or trajectory; got {attention!r}")
    return float(cost + 16 * m * c * c)


def pooler_flops(m: int, hidden: int, self_layers: int) -> float:
    """FLOPs of an attentive pooler on ``m`` tokens: ``self_layers`` self-attention layers, then one query
    cross-attending to the tokens."""
    c = hidden
    return float(self_layers * (24 * m * c * c + 4 * m * m * c) + 2 * c * c + 4 * m * c * c + 4 * m * c + 16 * c * c)


def stack_flops(
    input_tokens: int,
    tokens_per_layer: list[int],
    hidden: int,
    frames: int | None = None,
    attention: str | None = None,
    pooler: int | None = None,
) -> float:
    """FLOPs of all layers for one clip, from the tokens entering the first layer and leaving each layer,
    plus an attentive pooler with ``pooler`` self-attention layers after them (None: no pooler)."""
    total, n = 0.0, input_tokens
    for m in tokens_per_layer:
        total += layer_flops(n, m, hidden, frames, attention)
        n = m
    return total if pooler is None else total + pooler_flops(n, hidden, pooler)


@dataclass(frozen=True)
class FlopModel:
    """The FLOP model of one network, as a value: its ``attention`` (``joint``, ``divided`` or ``trajectory``),
    ``hidden`` size, ``frames`` of its token grid (divided and trajectory attention) and the self-attention
    layers of an attentive ``pooler`` after the last layer (None: none)."""

    attention: str
    hidden: int
    frames: int | None = None
    pooler: int | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}; got {self.attention!r}")

    def total(self, input_tokens: int, tokens_per_layer: list[int]) -> float:
        """FLOPs of one clip: ``input_tokens`` entering the first layer, ``tokens_per_layer`` leaving each."""
        return stack_flops(input_tokens, tokens_per_layer, self.hidden, self.frames, self.attention, self.pooler)

    def ratio(self, input_tokens: int, tokens_per_layer: list[int]) -> float:
        """Unpatched / patched FLOPs (the speedup bound) of a forward with these token counts."""
        full = self.total(input_tokens, [input_tokens] * len(tokens_per_layer))
        return full / self.total(input_tokens, tokens_per_layer)


def simulate_tokens(
    input_tokens: int,
    schedule: list[int],
    protected: int = 0,
    frames: int | None = None,
    duplicate: dict | None = None,
    capped: list[tuple[int, int, int]] | None = None,
) -> list[int]:
    """Tokens leaving each layer for a per-layer ``schedule`` of ``r``, without running the model: each step
    removes ``min(r, half the mergeable tokens)`` of a clip (joint) or of each of ``frames`` frames (divided,
    with ``protected`` tokens set aside), repeated ``1 + duplicate[layer]`` times. Layers whose first step
    asks for more than half are appended to ``capped`` as ``(layer, r, mergeable tokens)``."""
    duplicate = duplicate or {}
    counts = []
    mergeable = input_tokens - protected if frames is None else (input_tokens - protected) // frames
    for layer, r in enumerate(schedule):
        for step in range(1 + duplicate.get(layer, 0) if r > 0 else 0):
            if step == 0 and capped is not None and r > mergeable // 2:
                capped.append((layer, r, mergeable))
            if mergeable // 2 == 0:  # nothing left to merge: further steps remove nothing
                break
            mergeable -= min(r, mergeable // 2)
        counts.append(protected + (mergeable if frames is None else mergeable * frames))
    return counts


class BudgetWarning(UserWarning):
    """A FLOP budget below what merging can reach: the closest reachable schedule is used."""


@dataclass(frozen=True)
class Budget:
    """A resolved FLOP budget: the ``r`` setting chosen, and the fraction of the unpatched FLOPs it keeps."""

    r: int | tuple[int, float]
    fraction: float
    target: float


def resolve_budget(
    fraction_at: Callable[[int | tuple[int, float]], float], target: float, inflection: float | None = None
) -> Budget:
    """The smallest ``r`` (constant, or ``(r, inflection)``) whose FLOP fraction ``fraction_at(r)`` is at most
    ``target``: the schedule that meets the budget most closely without exceeding it. If no ``r`` reaches
    it (merging saturates), warns and returns the smallest ``r`` reaching the lowest fraction there is."""

    def setting(r: int) -> int | tuple[int, float]:
        return r if inflection is None else (r, inflection)

    if target >= 1.0:
        return Budget(setting(0), 1.0, target)
    hi, best = 1, fraction_at(setting(1))
    if best >= 1.0:  # no layer can merge (start_layer or layers leave none)
        warnings.warn(
            f"vtome: a budget of {target:.3f} of the FLOPs cannot be reached: no layer can merge with these "
            "settings (check start_layer and layers); r=0 is used",
            BudgetWarning,
            stacklevel=3,
        )
        return Budget(setting(0), 1.0, target)
    while best > target:
        nxt = fraction_at(setting(hi * 2))
        if nxt >= best:  # nothing more to gain: every layer merges all it can
            break
        hi, best = hi * 2, nxt
    if best > target:
        lo_frac = best
        lo, hi2 = hi // 2, hi
        while hi2 - lo > 1:  # smallest r with the saturated fraction
            mid = (lo + hi2) // 2
            lo, hi2 = (lo, mid) if fraction_at(setting(mid)) <= lo_frac else (mid, hi2)
        warnings.warn(
            f"vtome: a budget of {target:.3f} of the FLOPs cannot be reached; merging saturates at "
            f"{lo_frac:.3f} ({1 / lo_frac:.2f}x fewer FLOPs), which is used (r={setting(hi2)})",
            BudgetWarning,
            stacklevel=3,
        )
        return Budget(setting(hi2), fraction_at(setting(hi2)), target)
    lo = 0  # fraction_at(lo) > target >= fraction_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fraction_at(setting(mid)) <= target else (mid, hi)
    return Budget(setting(hi), fraction_at(setting(hi)), target)

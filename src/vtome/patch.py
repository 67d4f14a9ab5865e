"""The public entry points: patch a model in place, read what it did, change settings, unpatch.

Owns: the public API. The settings live in :mod:`vtome.settings`, the merge step in :mod:`vtome.merger`,
the families in :mod:`vtome.adapters`, the FLOP arithmetic in :mod:`vtome.flops`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch.nn as nn
from torch import Tensor

from vtome.adapters import Adapter, adapter_for, check_attention_backend, is_root, merger_of, patch_modules, restore
from vtome.flops import FlopModel, resolve_budget, simulate_tokens
from vtome.layout import Layout
from vtome.merge import unmerge_tokens
from vtome.merger import Merger, RunInfo
from vtome.settings import MergeSettings, RSetting


def patch(
    model: nn.Module,
    r: RSetting = 0,
    *,
    mode: str = "merge",
    prop_attn: bool | None = None,
    head_aggregation: str = "mean",
    threshold: float = 0.0,
    start_layer: int = 0,
    trace_source: bool = False,
    seed: int | None = None,
    duplicate: dict[int, int] | None = None,
    layers: list[int] | None = None,
    order: str = "paper",
    divided: str | None = None,
    position_merge: str | None = None,
    flops: float | None = None,
    inflection: float | None = None,
) -> nn.Module:
    """Patch ``model`` in place for token merging and return it.

    Args:
        model: a Hugging Face VideoMAE, ViViT, TimeSformer or V-JEPA 2 model (base or video classification), a
            Motionformer (:mod:`vtome.architectures.motionformer`), or a subclass of one of these.
        r: tokens removed per layer (per clip for joint space-time models, per frame for TimeSformer and
            Motionformer): an int, an ``(r, inflection)`` schedule with inflection a float in [-1, 1], or a
            list of one int per layer. Each layer removes at most half of its mergeable tokens (a warning says
            when it is capped).
        mode: ``merge``, ``drop``, ``random_merge``, ``random_drop`` or ``hybrid``.
        prop_attn: add ``log(size)`` to attention logits; ``None`` takes the family's default (off for
            VideoMAE, as in the paper's configurations; on for the others, as in ToMe).
        head_aggregation: matching metric from the keys: ``mean`` over heads or heads ``concat``.
        threshold: for ``hybrid``, the cosine similarity from which a pair merges instead of dropping
            (the paper used 0.4 for ViViT and 0.8 for VideoMAE).
        start_layer: no merging in layers before this one.
        layers: merge only in these layers (indices from 0); ``None``: every layer.
        trace_source: record which input tokens each output token covers (``last_run(model).source``).
        seed: makes the random modes reproducible (the same choice at every forward).
        duplicate: ``{layer: extra}`` repeats that layer's merge step ``extra`` more times (each on the
            merged keys, removing up to ``r`` more tokens) with no extra attention or MLP compute there.
        order: ``paper`` (the published A/B split over the whole sequence and order of the tokens that stay,
            see :mod:`vtome.merge`) or ``spatial`` (alternation after the class token, tokens kept in their
            original order).
        divided: divided space-time models only: ``per_frame`` (default; each frame picks its own pairs, as
            published) or ``aligned`` (one matching per clip from the keys averaged over its frames, so every
            frame merges the same slots). ``ValueError`` on joint space-time models.
        position_merge: models with rotary positions (V-JEPA 2) only: a merged token sits at the size-weighted
            ``mean`` position of its patches (default), or at its ``destination`` token's position.
        flops: instead of ``r``, a budget: the fraction of the unpatched transformer FLOPs to keep (e.g. 0.5).
            It is resolved from the FLOP model (:mod:`vtome.flops`) to the smallest ``r`` that meets it, with
            ``start_layer``, ``layers`` and ``duplicate`` taken into account; ``settings(model).r`` shows the
            choice and ``last_run(model).flop_ratio`` the result. A budget merging cannot reach warns
            (:class:`vtome.flops.BudgetWarning`) and uses the closest reachable schedule.
        inflection: with ``flops``, resolve an ``(r, inflection)`` schedule instead of a constant ``r``.

    Patching a patched model starts again from these settings. To change one setting in place, assign
    it on :func:`settings` (``vtome.settings(model).r = 100``); it takes effect at the next forward.
    """
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    if layout.frames is None and divided is not None:
        raise ValueError(
            f"divided={divided!r} applies to divided space-time models (TimeSformer, Motionformer); "
            f"{type(model).__name__} attends jointly over the clip, so leave divided unset"
        )
    if not adapter.positions and position_merge is not None:
        raise ValueError(
            f"position_merge={position_merge!r} applies to models with rotary positions (V-JEPA 2); "
            f"{type(model).__name__} has none, so leave position_merge unset"
        )
    if flops is not None and r != 0:
        raise ValueError("pass either r (tokens per layer) or flops (a budget), not both")
    if inflection is not None and flops is None:
        raise ValueError("inflection goes with flops; for a fixed schedule pass r=(r, inflection)")
    settings = MergeSettings(
        num_layers=len(adapter.layers(model)),
        r=r,
        mode=mode,
        prop_attn=adapter.prop_attn if prop_attn is None else prop_attn,
        head_aggregation=head_aggregation,
        threshold=threshold,
        start_layer=start_layer,
        trace_source=trace_source,
        seed=seed,
        duplicate=duplicate,
        layers=layers,
        order=order,
        divided=(divided or "per_frame") if layout.frames is not None else None,
        position_merge=(position_merge or "mean") if adapter.positions else None,
        flops=flops,
    )
    if flops is not None:
        resolved = resolve_budget(_fraction_for(model, adapter, settings), settings.flops, inflection)
        settings = replace(settings, r=resolved.r)
    if settings.prop_attn:
        check_attention_backend(model.config)
    unpatch(model)
    merger = Merger(settings, layout, model.config.num_attention_heads, adapter.flop_model(model))
    patch_modules(model, adapter, merger)
    return model


def _fraction_for(model: nn.Module, adapter: Adapter, settings: MergeSettings) -> Callable[[RSetting], float]:
    """FLOP fraction (patched / unpatched, from the FLOP model) of ``model`` as a function of the ``r`` setting."""
    layout, flop_model = adapter.layout(model), adapter.flop_model(model)
    n0 = adapter.token_positions(model)[0].shape[0]

    def fraction(r: RSetting) -> float:
        schedule = replace(settings, r=r).schedule()
        counts = simulate_tokens(n0, schedule, layout.protected, layout.frames, settings.duplicate)
        return 1.0 / flop_model.ratio(n0, counts)

    return fraction


def unpatch(model: nn.Module) -> nn.Module:
    """Restore ``model``'s own classes (no-op if it is not patched). ``ValueError`` for a submodule of a patched
    model: unpatch the model that was patched."""
    if not is_root(model) and any(merger_of(module) is not None for module in model.modules()):
        raise ValueError(
            f"this {type(model).__name__} is part of a patched model (or holds parts of one); call vtome.unpatch "
            "on the model you patched (the one passed to vtome.patch)"
        )
    for module in model.modules():
        restore(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` was patched by :func:`patch` (and not unpatched since)."""
    return is_root(model)


def merger(model: nn.Module) -> Merger:
    """The merge state of a patched ``model`` (settings, layout, FLOP model, last run); tools instrument it."""
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched; call vtome.patch(model, r=...) first")
    return merger_of(model)


def last_run(model: nn.Module) -> RunInfo:
    """What the last forward of a patched ``model`` did: ``tokens_per_layer``, ``size``, ``index``, ``flop_ratio``."""
    return merger(model).run


def unmerge(model: nn.Module, tokens: Tensor) -> Tensor:
    """Map tokens ``[B, N, C]`` laid out like the output of a patched ``model``'s last forward (its last
    hidden state, or features computed from it) back to the input token grid ``[B, N0, C]``: each input
    position gets the token that covers it, a dropped position (``drop`` modes) gets zeros."""
    run = last_run(model)
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"unmerge expects tokens as a torch.Tensor [batch, tokens, channels]; got {type(tokens).__name__} "
            "(convert it with torch.as_tensor first)"
        )
    if tokens.dim() != 3:
        raise ValueError(f"unmerge expects tokens [batch, tokens, channels]; got shape {tuple(tokens.shape)}")
    if not run.tokens_per_layer:
        raise ValueError("unmerge needs the model's last forward, and none has run yet; run the model first")
    n_out = run.tokens_per_layer[-1]
    if tokens.shape[1] != n_out:
        raise ValueError(
            f"unmerge expects the {n_out} tokens of the model's last forward, got {tokens.shape[1]}; "
            "run the model on the clip first, then unmerge its output"
        )
    batch = run.index.shape[0] if run.index is not None else run.batch
    if tokens.shape[0] != batch:
        raise ValueError(f"the last forward had batch {batch}, these tokens have {tokens.shape[0]}")
    index = None if run.index is None else run.index.to(tokens.device)
    return unmerge_tokens(tokens, index)


def settings(model: nn.Module) -> MergeSettings:
    """The live settings of a patched ``model``; assigning an attribute validates it and takes effect at the
    next forward (values are immutable: assign a new one to change a list or mapping)."""
    return merger(model).settings


def layout(model: nn.Module) -> Layout:
    """Where a patched ``model``'s mergeable tokens sit (``frames`` is set for divided space-time models)."""
    return merger(model).layout


def flop_model(model: nn.Module) -> FlopModel:
    """The FLOP model of a patched ``model`` (attention kind, hidden size, frames, attentive pooler)."""
    return merger(model).flop_model


def last_run_flops(model: nn.Module) -> tuple[float, float]:
    """``(unmerged, merged)`` FLOPs per clip of a patched ``model``'s last forward (ratio = speedup bound)."""
    run, flops = last_run(model), flop_model(model)
    n0 = run.input_tokens
    return flops.total(n0, [n0] * len(run.tokens_per_layer)), flops.total(n0, run.tokens_per_layer)

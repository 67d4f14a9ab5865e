"""Divided space-time models: the aligned scheme (one matching per clip, shared by all its frames)."""

from __future__ import annotations

import pytest
import torch
from conftest import clip, tiny

import vtome
from vtome.visualize import groups_after_layer

DIVIDED = ("timesformer", "motionformer")


def frame_and_place(family: str, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame and spatial position of every input token (class token: -1)."""
    cfg = model.config
    grid = (cfg.image_size // 16) ** 2
    frames = cfg.num_frames if family == "timesformer" else cfg.num_frames // cfg.tubelet_size
    idx = torch.arange(grid * frames)
    if family == "timesformer":  # 1 + place * T + t
        frame, place = idx % frames, idx // frames
    else:  # 1 + t * P + place
        frame, place = idx // grid, idx % grid
    return torch.cat([torch.tensor([-1]), frame]), torch.cat([torch.tensor([-1]), place])


@pytest.mark.parametrize("family", DIVIDED)
@pytest.mark.parametrize("mode", ["merge", "hybrid", "drop", "random_merge"])
def test_aligned_slots_cover_the_same_places_in_every_frame(family, mode):
    model = vtome.patch(tiny(family), r=3, divided="aligned", mode=mode, threshold=0.3, trace_source=True, seed=0)
    with torch.no_grad():
        model(pixel_values=clip(model))
    run = vtome.last_run(model)
    frame, place = frame_and_place(family, model)
    layout = vtome.layout(model)
    n_out = run.tokens_per_layer[-1]
    slots = layout.slot(torch.arange(1, n_out), n_out)
    assert n_out < run.input_tokens
    for b in range(2):
        covered = {}
        for token, slot in zip(range(1, n_out), slots.tolist()):
            inputs = run.source[b, token].nonzero().flatten()
            frames = set(frame[inputs].tolist())
            assert len(frames) <= 1  # a token stays inside one frame
            covered.setdefault(slot, []).append(frozenset(place[inputs].tolist()))
        for slot, places in covered.items():
            assert len(places) == layout.frames and len(set(places)) == 1, (slot, places)
    per_frame = vtome.patch(tiny(family), r=3, mode=mode, threshold=0.3, trace_source=True, seed=0)
    with torch.no_grad():
        per_frame(pixel_values=clip(model))
    assert not torch.equal(vtome.last_run(per_frame).source, run.source)  # frames differ: so do matchings


@pytest.mark.parametrize("family", DIVIDED)
def test_identical_frames_give_the_same_pairs_in_both_schemes(family):
    model = tiny(family)
    emb = model.timesformer.embeddings if family == "timesformer" else model.embeddings
    with torch.no_grad():
        emb.time_embeddings.zero_()  # frames then differ in nothing
    x = clip(model)
    x[:] = x[:, :1]
    runs, outs = [], []
    for divided in ("per_frame", "aligned"):
        vtome.patch(model, r=3, divided=divided, trace_source=True)
        with torch.no_grad():
            outs.append(model(pixel_values=x).logits)
        runs.append(vtome.last_run(model))
    assert torch.equal(runs[0].source, runs[1].source)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("family", DIVIDED)
def test_aligned_at_r0_is_exact_and_setting_is_validated(family):
    model = tiny(family)
    x = clip(model)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
        vtome.patch(model, r=0, divided="aligned")
        assert torch.equal(model(pixel_values=x).logits, ref)
    vtome.settings(model).divided = "per_frame"
    with pytest.raises(ValueError, match="divided must be"):
        vtome.settings(model).divided = "sideways"
    with pytest.raises(ValueError, match="divided space-time models"):
        vtome.patch(tiny("vivit"), r=2, divided="aligned")
    joint = vtome.patch(tiny("videomae"), r=2)
    with pytest.raises(ValueError, match="divided space-time models"):
        vtome.settings(joint).divided = "aligned"


def test_visualized_aligned_groups_are_the_same_in_every_frame():
    model = tiny("timesformer")
    groups = groups_after_layer(model, clip(model), r=3, divided="aligned")
    frame, place = frame_and_place("timesformer", model)
    per_frame = [groups[1:][frame[1:] == t] for t in range(4)]  # group id of each place, frame by frame
    assert all(torch.equal(per_frame[0], g) for g in per_frame[1:])
    assert len(set(per_frame[0].tolist())) < 16  # and something was merged

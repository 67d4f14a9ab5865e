"""The clip generator: deterministic, balanced, and every label visible in the pixels."""

from __future__ import annotations

import pytest
import torch

from vtome.demo.synth import (
    APPEARANCE_CLASSES,
    CLASSES,
    NUM_APPEARANCE,
    ClipSpec,
    clip_seed,
    label_of,
    make_batch,
    make_clip,
    render,
)

SPEC = ClipSpec(frames=8, size=64)


def test_deterministic_per_seed_and_index():
    a, la = make_clip(0, "test", 7, SPEC)
    b, lb = make_clip(0, "test", 7, SPEC)
    assert torch.equal(a, b) and la == lb
    assert a.shape == (8, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, make_clip(1, "test", 7, SPEC)[0])
    assert not torch.equal(a, make_clip(0, "train", 7, SPEC)[0])
    clips, labels = make_batch(0, "test", [7, 8], SPEC)
    assert torch.equal(clips[0], a) and labels[0] == la


def test_labels_are_balanced_and_splits_differ():
    labels = [label_of(0, "train", i) for i in range(150)]
    assert all(labels.count(c) == 10 for c in range(len(CLASSES)))
    assert clip_seed(0, "train", 3) != clip_seed(0, "test", 3)
    with pytest.raises(ValueError, match="split must be one of"):
        clip_seed(0, "holdout", 1)


def test_backgrounds_are_textured_not_flat():
    clip, _ = make_clip(0, "test", 0, SPEC)
    patches = clip[0].unfold(1, 16, 16).unfold(2, 16, 16).reshape(3, 16, -1).mean(-1)  # [3, 16 patches]
    assert patches.std(1).mean() > 0.02  # tokens are similar but not identical


def _object_track(label: int, seed: int):
    """Centroid, area and brightness of the object per frame, from a background-free rendering."""
    clip = render(label, torch.Generator().manual_seed(seed), ClipSpec(frames=16, size=96), background=False)
    diff = (clip - 0.3).abs().sum(1)  # [T, H, W]
    mask = diff > 0.15
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    area = mask.float().sum((1, 2))
    cx = (xs * mask).sum((1, 2)) / area.clamp(min=1)
    cy = (ys * mask).sum((1, 2)) / area.clamp(min=1)
    return clip, mask, cx, cy, area, diff.sum((1, 2))


@pytest.mark.parametrize("seed", range(4))
def test_temporal_labels_recoverable_from_pixels(seed):
    names = CLASSES[NUM_APPEARANCE:]
    for kind, name in enumerate(names):
        clip, mask, cx, cy, area, energy = _object_track(NUM_APPEARANCE + kind, seed)
        if name in ("moving left", "moving right"):
            assert (cx[-1] - cx[0]) * (1 if name == "moving right" else -1) > 20
            assert abs(cy[-1] - cy[0]) < 3
        elif name in ("moving up", "moving down"):
            assert (cy[-1] - cy[0]) * (1 if name == "moving down" else -1) > 20
            assert abs(cx[-1] - cx[0]) < 3
        elif name in ("coming towards", "going away"):
            assert area[-1] / area[0] > 2.5 if name == "coming towards" else area[0] / area[-1] > 2.5
        elif name in ("turning clockwise", "turning anticlockwise"):
            px, py = cx - cx.mean(), cy - cy.mean()
            turn = (px[:-1] * py[1:] - py[:-1] * px[1:]).sum()  # > 0: clockwise on screen (y down)
            assert turn > 0 if name == "turning clockwise" else turn < 0
        else:
            assert energy[-1] > 5 * energy[0] if name == "appearing" else energy[0] > 5 * energy[-1]
        if name not in ("appearing", "disappearing"):
            grey = clip[:, :, mask[0]]  # the object is plain grey: channels equal
            assert (grey.max(1).values - grey.min(1).values).abs().max() < 0.05


@pytest.mark.parametrize("seed", range(3))
def test_appearance_labels_recoverable_from_pixels(seed):
    colours = {"red": 0, "green": 1, "blue": 2, "yellow": (0, 1), "magenta": (0, 2)}
    for label, name in enumerate(APPEARANCE_CLASSES):
        clip, mask, *_ = _object_track(label, seed)
        pixels = clip[:, :, mask[0]] if mask[0].any() else clip[:1, :, mask[1]]
        mean = pixels.mean((0, 2))  # RGB of the object
        strong = colours[name.split()[0]]
        strong = (strong,) if isinstance(strong, int) else strong
        weak = [c for c in range(3) if c not in strong]
        assert min(mean[list(strong)]) > max(mean[weak]) + 0.1, (name, mean)


def test_time_reversal_maps_each_class_to_its_twin():
    from vtome.demo.synth import reversed_label

    assert [CLASSES[reversed_label(c)] for c in range(NUM_APPEARANCE)] == list(APPEARANCE_CLASSES)
    pairs = {CLASSES[c]: CLASSES[reversed_label(c)] for c in range(NUM_APPEARANCE, len(CLASSES))}
    assert pairs["moving left"] == "moving right" and pairs["appearing"] == "disappearing"
    assert pairs["coming towards"] == "going away" and pairs["turning anticlockwise"] == "turning clockwise"
    assert all(reversed_label(reversed_label(c)) == c for c in range(len(CLASSES)))
    # a "moving left" clip played backwards moves right
    clip, mask, cx, *_ = _object_track(CLASSES.index("moving left"), 0)
    backwards = cx.flip(0)
    assert backwards[-1] - backwards[0] > 20


def test_reverse_half_flips_clips_and_labels_together():
    from vtome.demo.train import reverse_half

    clips, labels = make_batch(0, "train", range(30), SPEC)
    out, new = reverse_half(clips, labels, torch.Generator().manual_seed(0))
    flipped = [i for i in range(30) if not torch.equal(out[i], clips[i])]
    assert 5 < len(flipped) < 25
    for i in range(30):
        if i in flipped:
            assert torch.equal(out[i], clips[i].flip(0))
        assert (new[i] != labels[i]) == (i in flipped and labels[i] >= NUM_APPEARANCE)

"""Deterministic labelled video clips, pure torch, no downloads: the offline stand-in for real datasets.

Two families of classes, as in the paper's datasets:

- **appearance** (like Kinetics-400): *what* is in the clip, a coloured, patterned object, which moves
  in a random direction at a random speed (distractor motion that says nothing about the class);
- **temporal** (like Something-Something v2): *how* a small plain grey object moves: left / right, up /
  down, towards / away (growing / shrinking), clockwise / anticlockwise, appearing / disappearing. Any
  single frame is ambiguous; the class is in the change over time. As in real video, the actor covers
  only a few patches (about one 16 px patch across at 96 px) and moves a fraction of the frame.

Every clip has a textured, slowly panning background plus pixel noise, so that many tokens are similar
but not identical. Clip ``i`` of a split depends only on ``(seed, split, i)``, at any frame count: the
motion is defined over normalised time, so 8- and 16-frame renderings show the same event.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

APPEARANCE_CLASSES: tuple[str, ...] = (
    "red disk",
    "green checkered square",
    "blue striped square",
    "yellow ring",
    "magenta cross",
)
TEMPORAL_CLASSES: tuple[str, ...] = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "coming towards",
    "going away",
    "turning clockwise",
    "turning anticlockwise",
    "appearing",
    "disappearing",
)
CLASSES: tuple[str, ...] = APPEARANCE_CLASSES + TEMPORAL_CLASSES
NUM_APPEARANCE = len(APPEARANCE_CLASSES)
SPLITS = {"train": 0, "val": 1, "test": 2}

_COLOURS = {
    "red": (0.9, 0.15, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "magenta": (0.9, 0.1, 0.85),
}


def is_temporal(label: int) -> bool:
    return label >= NUM_APPEARANCE


def reversed_label(label: int) -> int:
    """The class of the clip played backwards: temporal classes swap with their twin (left <-> right,
    appearing <-> disappearing, ...); appearance classes keep theirs."""
    if not is_temporal(label):
        return label
    kind = label - NUM_APPEARANCE
    return NUM_APPEARANCE + (kind ^ 1)


@dataclass(frozen=True)
class ClipSpec:
    """Clip geometry: ``frames`` x ``size`` x ``size`` RGB."""

    frames: int = 16
    size: int = 96


def clip_seed(seed: int, split: str, index: int) -> int:
    """A stable 63-bit seed for clip ``index`` of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return zlib.crc32(f"{seed}:{split}:{index}".encode()) * 1_000_003 + index


def label_of(seed: int, split: str, index: int) -> int:
    """The class of clip ``index`` (balanced over the 15 classes within any 15 consecutive clips)."""
    order = torch.randperm(len(CLASSES), generator=torch.Generator().manual_seed(clip_seed(seed, split, index // 15)))
    return int(order[index % 15])


def make_clip(seed: int, split: str, index: int, spec: ClipSpec = ClipSpec()) -> tuple[Tensor, int]:
    """Clip ``index`` of ``split``: ``[T, 3, H, W]`` float in [0, 1], and its label."""
    label = label_of(seed, split, index)
    g = torch.Generator().manual_seed(clip_seed(seed, split, index))
    return render(label, g, spec), label


def make_batch(seed: int, split: str, indices: range | list[int], spec: ClipSpec = ClipSpec()) -> tuple[Tensor, Tensor]:
    """Clips ``[B, T, 3, H, W]`` in [0, 1] and labels ``[B]``."""
    clips, labels = zip(*(make_clip(seed, split, i, spec) for i in indices))
    return torch.stack(clips), torch.tensor(labels)


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _background(g: torch.Generator, spec: ClipSpec, t: Tensor) -> Tensor:
    """Oriented gratings plus smooth blotches, panning slowly: ``[T, 3, H, W]``."""
    n = spec.size
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    pan = torch.tensor([_u(g, -6, 6), _u(g, -6, 6)])
    x = xs[None] + pan[0] * t[:, None, None]
    y = ys[None] + pan[1] * t[:, None, None]
    base = torch.rand(3, generator=g) * 0.3 + 0.15
    out = base[None, :, None, None].expand(len(t), 3, n, n).clone()
    for _ in range(3):
        angle, freq = _u(g, 0, math.pi), _u(g, 0.04, 0.25)
        phase = _u(g, 0, 2 * math.pi)
        wave = torch.sin(freq * (x * math.cos(angle) + y * math.sin(angle)) + phase)
        out += 0.08 * wave[:, None] * (torch.rand(3, generator=g)[None, :, None, None] * 2 - 1)
    blotch = torch.rand(1, 3, 6, 6, generator=g) - 0.5
    out += 0.25 * torch.nn.functional.interpolate(blotch, size=(n, n), mode="bicubic", align_corners=False)
    return out


def _shape_mask(shape: str, dx: Tensor, dy: Tensor, radius: Tensor) -> Tensor:
    """Soft mask of ``shape`` centred at offsets ``dx, dy`` ``[T, H, W]`` with radius ``[T, 1, 1]``."""
    if shape == "disk":
        dist = torch.sqrt(dx**2 + dy**2) - radius
    elif shape == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - radius * 0.85
    elif shape == "ring":
        dist = (torch.sqrt(dx**2 + dy**2) - radius * 0.7).abs() - radius * 0.3
    elif shape == "cross":
        arm = radius * 0.3
        dist = torch.minimum(
            torch.maximum(dx.abs() - radius, dy.abs() - arm), torch.maximum(dx.abs() - arm, dy.abs() - radius)
        )
    else:
        raise ValueError(shape)
    return torch.sigmoid(-dist * 1.5)


def _pattern(name: str, dx: Tensor, dy: Tensor, g: torch.Generator) -> Tensor:
    """Fill pattern in [0, 1] over the object's own coordinates, ``[T, H, W]``."""
    if name == "checker":
        return ((torch.floor(dx / 5) + torch.floor(dy / 5)) % 2) * 0.8 + 0.2
    if name == "stripes":
        angle = _u(g, 0, math.pi)
        return (torch.sin((dx * math.cos(angle) + dy * math.sin(angle)) * 0.9) > 0).float() * 0.8 + 0.2
    return torch.ones_like(dx)


def render(label: int, g: torch.Generator, spec: ClipSpec = ClipSpec(), background: bool = True) -> Tensor:
    """Render one clip of class ``label`` from generator ``g``: ``[T, 3, H, W]`` in [0, 1].

    ``background=False`` draws the same object on flat grey without noise (for checking the labels).
    """
    n, frames = spec.size, spec.frames
    t = torch.linspace(0, 1, frames)
    out = _background(g, spec, t)
    if not background:
        out = torch.full_like(out, 0.3)
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    # object radius: appearance objects are large; the actors of temporal classes are small, as in real video
    radius = torch.full((frames,), _u(g, 0.12, 0.17) * n if not is_temporal(label) else _u(g, 0.08, 0.11) * n)
    alpha = torch.ones(frames)
    if not is_temporal(label):
        name = APPEARANCE_CLASSES[label]
        colour_name, *rest = name.split()
        shape = rest[-1]
        pattern = {"checkered": "checker", "striped": "stripes"}.get(rest[0], "solid")
        colour = torch.tensor(_COLOURS[colour_name])
        # distractor motion: random direction and speed, unrelated to the class
        cx0, cy0 = _u(g, 0.3, 0.7) * n, _u(g, 0.3, 0.7) * n
        angle, speed = _u(g, 0, 2 * math.pi), _u(g, 0, 0.3) * n
        cx = cx0 + speed * (t - 0.5) * math.cos(angle)
        cy = cy0 + speed * (t - 0.5) * math.sin(angle)
    else:
        kind = label - NUM_APPEARANCE
        shape, pattern = ("disk", "square")[int(_u(g, 0, 2))], "solid"
        grey = _u(g, 0.75, 1.0)
        colour = torch.tensor([grey, grey, grey])
        travel = _u(g, 0.25, 0.4) * n
        cx0, cy0 = _u(g, 0.35, 0.65) * n, _u(g, 0.35, 0.65) * n
        cx, cy = torch.full((frames,), cx0), torch.full((frames,), cy0)
        if kind in (0, 1):  # left / right
            cx = cx0 + travel * (t - 0.5) * (-1 if kind == 0 else 1)
        elif kind in (2, 3):  # up / down (image y grows downwards)
            cy = cy0 + travel * (t - 0.5) * (-1 if kind == 2 else 1)
        elif kind in (4, 5):  # towards (grows) / away (shrinks)
            start = _u(g, 0.05, 0.07) * n
            grow = torch.exp(math.log(2.0) * (t if kind == 4 else 1 - t))
            radius = start * grow
        elif kind in (6, 7):  # clockwise / anticlockwise on screen
            orbit, phase = _u(g, 0.15, 0.22) * n, _u(g, 0, 2 * math.pi)
            sign = 1 if kind == 6 else -1  # +angle is clockwise with y pointing down
            theta = phase + sign * 1.5 * math.pi * t
            cx, cy = n / 2 + orbit * torch.cos(theta), n / 2 + orbit * torch.sin(theta)
        else:  # appearing / disappearing
            alpha = t.clone() if kind == 8 else 1 - t
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    mask = _shape_mask(shape, dx, dy, radius[:, None, None]) * alpha[:, None, None]
    fill = _pattern(pattern, dx, dy, g)[:, None] * colour[None, :, None, None]
    out = out * (1 - mask[:, None]) + fill * mask[:, None]
    if background:
        out += 0.03 * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


def normalize(clips: Tensor) -> Tensor:
    """Map [0, 1] pixels to the models' input range ([-1, 1]); works on any shape."""
    return (clips - 0.5) / 0.5

"""``vtome visualize``: draw which input patches were merged together, on the clip's own frames.

Each merge group is filled with its mean colour (or keeps the original pixels) and outlined in a colour
of its own. Joint space-time models can merge across frames: such a group has the same colour in every
frame it covers. Divided space-time models merge inside each frame; with ``divided="aligned"`` every
frame has the same groups, drawn in the same colour in every frame. Dropped patches are shown dark.
"""

from __future__ import annotations

import colorsys
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import vtome
from vtome.adapters import adapter_for
from vtome.adapters.inputs import clip_kwargs, clip_shape
from vtome.data.transforms import Preprocess, preprocess_for
from vtome.data.video import list_frames, read_frames, sample_video, segment_indices, write_video
from vtome.merger import CapWarning

FILLS: tuple[str, ...] = ("mean", "pixels", "colour")


@dataclass
class Clip:
    pixel_values: torch.Tensor  # [1, T, C, H, W], normalised for the model
    display: np.ndarray  # [T, H, W, 3] uint8, the same frames as seen by the model (resized, cropped)


def load_clip(path: str | Path, pre: Preprocess) -> Clip:
    """Frames of a video file or frame folder, spread over its length, as the model sees them."""
    path = Path(path)
    if path.is_file():
        frames = sample_video(path, lambda total: segment_indices(total, pre.num_frames))  # keeps only those
    elif path.is_dir():
        files = list_frames(path)
        frames = read_frames(files, segment_indices(len(files), pre.num_frames))
    else:
        raise FileNotFoundError(f"{path}: no such video file or frame folder")
    return clip_from_frames(frames, pre)


def clip_from_frames(frames: np.ndarray, pre: Preprocess) -> Clip:
    """A :class:`Clip` from ``[T, H, W, 3]`` uint8 frames."""
    x = pre(frames)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    display = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return Clip(x.unsqueeze(0), display)


def groups_after_layer(
    model: nn.Module, pixel_values: torch.Tensor, layer: int | None = None, **patch_kwargs: object
) -> torch.Tensor:
    """Merge group of every input token after ``layer`` (default: the last), ``[N0]``: the index of the
    output token covering it, -1 where it was dropped. ``patch_kwargs`` go to :func:`vtome.patch`
    (``r``, ``mode``, ...); the model itself is not changed."""
    probe = vtome.patch(copy.deepcopy(model), **patch_kwargs)
    layers = vtome.settings(probe).num_layers
    if layer is not None:
        if not 0 <= layer < layers:
            raise ValueError(f"layer must be in [0, {layers - 1}]; got {layer}")
        schedule = vtome.settings(probe).schedule()
        vtome.settings(probe).r = [r if i <= layer else 0 for i, r in enumerate(schedule)]
        vtome.settings(probe).start_layer = 0
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        probe(**clip_kwargs(probe, pixel_values[:1]))
    run = vtome.last_run(probe)
    if run.index is None:  # nothing was merged
        return torch.arange(run.input_tokens)
    groups = run.index[0].clone()
    layout = vtome.layout(probe)
    if vtome.settings(probe).divided == "aligned":  # one group per slot, the same in every frame
        kept = groups >= 0
        groups[kept] = layout.slot(groups[kept], run.tokens_per_layer[-1])
    return groups


def palette(n: int) -> np.ndarray:
    """``n`` well-separated colours, ``[n, 3]`` uint8 (golden-ratio hues)."""
    hues = (np.arange(n) * 0.61803398875) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255


def label_maps(groups: torch.Tensor, positions: torch.Tensor, tubelet: int, frames: int, side: int) -> np.ndarray:
    """Group id per frame and patch, ``[T, side, side]`` (-1: dropped); class tokens are skipped."""
    labels = np.full((frames, side, side), -1, dtype=np.int64)
    for g, (t0, y, x) in zip(groups.tolist(), positions.tolist()):
        if t0 < 0:
            continue
        labels[t0 : t0 + tubelet, y, x] = g
    return labels


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``[T, H, W]`` or ``[T, H, W, C]`` by an integer ``scale``."""
    return frames if scale == 1 else frames.repeat(scale, axis=1).repeat(scale, axis=2)


def display_scale(patch: int, min_patch_px: int = 16) -> int:
    """Integer enlargement that draws each patch with at least ``min_patch_px`` pixels (at least 2x)."""
    return max(2, -(-min_patch_px // patch))


def draw(display: np.ndarray, labels: np.ndarray, patch: int, fill: str = "mean", scale: int = 1) -> np.ndarray:
    """Frames with merge groups drawn: ``display`` ``[T, H, W, 3]``, ``labels`` ``[T, h, w]`` ->
    ``[T, H * scale, W * scale, 3]``.

    Each group is filled with its mean colour (``fill="mean"``, what the merged token stands for) or keeps
    the pixels (``"pixels"``), and is outlined in a colour of its own (the same colour in every frame it
    covers). Dropped patches are darkened and hatched.
    """
    h, w = display.shape[1:3]
    pix = labels.repeat(patch, axis=1).repeat(patch, axis=2)[:, :h, :w]  # [T, H, W]
    ids, first, inverse = np.unique(pix, return_index=True, return_inverse=True)
    inverse = inverse.reshape(pix.shape)
    flat = display.reshape(-1, 3).astype(np.float64)
    sums = np.zeros((len(ids), 3))
    np.add.at(sums, inverse.reshape(-1), flat)
    counts = np.bincount(inverse.reshape(-1), minlength=len(ids))[:, None]
    means = sums / np.maximum(counts, 1)
    # colours in order of first appearance (frame by frame, row by row): neighbours in a frame differ in hue
    colours = palette(len(ids))[np.argsort(np.argsort(first))]
    out = means[inverse] if fill == "mean" else display.astype(np.float64)
    if fill == "colour":
        out = 0.5 * out + 0.5 * colours[inverse]
    out, pix, inverse = upscale(out, scale), upscale(pix, scale), upscale(inverse, scale)
    dropped = pix < 0
    out[dropped] *= 0.25
    ys, xs = np.indices(pix.shape[1:])
    hatch = ((ys + xs) % 8 < 2)[None] & dropped
    out[hatch] = 90.0
    edge = np.zeros_like(pix, dtype=bool)
    edge[:, :-1, :] |= pix[:, :-1, :] != pix[:, 1:, :]
    edge[:, 1:, :] |= pix[:, 1:, :] != pix[:, :-1, :]
    edge[:, :, :-1] |= pix[:, :, :-1] != pix[:, :, 1:]
    edge[:, :, 1:] |= pix[:, :, 1:] != pix[:, :, :-1]
    edge[:, [0, -1], :] = edge[:, :, [0, -1]] = True  # groups at the frame's border are outlined there too
    edge &= ~dropped
    out[edge] = colours[inverse[edge]]
    return out.clip(0, 255).astype(np.uint8)


def visualize_clip(
    model: nn.Module,
    clip: Clip,
    layer: int | None = None,
    fill: str = "mean",
    scale: int = 1,
    **patch_kwargs: object,
) -> tuple[np.ndarray, torch.Tensor]:
    """Drawn frames ``[T, H * scale, W * scale, 3]`` and the group of each input token ``[N0]``, for
    ``model`` merging as asked (``patch_kwargs`` go to :func:`vtome.patch`)."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}; got {fill!r}")
    groups = groups_after_layer(model, clip.pixel_values, layer, **patch_kwargs)
    positions, tubelet, patch = adapter_for(model).token_positions(model)
    side = clip_shape(model)[2] // patch
    labels = label_maps(groups, positions, tubelet, clip.display.shape[0], side)
    return draw(clip.display, labels, patch, fill, scale), groups


def describe(
    model: nn.Module, name: str, groups: torch.Tensor, layer: int | None = None, **patch_kwargs: object
) -> str:
    """One-line caption: model, mode, r, layer shown and tokens left (``groups`` ``[N0]`` from
    :func:`visualize_clip`, ``patch_kwargs`` as given to it)."""
    s = vtome.settings(vtome.patch(copy.deepcopy(model), **patch_kwargs))
    positions, _, _ = adapter_for(model).token_positions(model)
    patches = groups[positions[:, 0] >= 0]
    left, dropped = len(set(patches[patches >= 0].tolist())), int((patches < 0).sum())
    frames = adapter_for(model).layout(model).frames
    shown = s.num_layers if layer is None else layer + 1
    r = s.r if isinstance(s.r, int) else s.schedule()
    if frames:  # divided space-time: r and the tokens left count per frame
        per_frame = left if s.divided == "aligned" else left // frames
        where = f"{per_frame} of {len(patches) // frames} tokens per frame left"
        how = f"{s.mode} ({s.divided.replace('_', '-')}), r={r} per frame"
    else:
        where, how = f"{left} of {len(patches)} tokens left", f"{s.mode}, r={r}"
    text = f"{name} · {how} · after layer {shown} of {s.num_layers}: {where}"
    return text + (f", {dropped} input tokens dropped" if dropped else "")


def _font(size: int) -> object:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _canvas(width: int, height: int) -> object:
    from PIL import Image

    return Image.new("RGB", (width, height), (255, 255, 255))


def _text_height(size: int) -> int:
    return int(size * 1.5)


KEYS = {
    "mean": "a token: the patches merged into it, filled with their mean colour, outlined in the token's colour",
    "colour": "a token: the patches merged into it, tinted and outlined in the token's colour (in every frame)",
    "pixels": "a token: the patches merged into it, outlined in the token's colour (in every frame)",
}


def compose(
    original: np.ndarray, drawn: np.ndarray, caption: str, fill: str = "mean", max_frames: int = 8
) -> np.ndarray:
    """A picture ``[H', W', 3]``: the original frames (enlarged to the drawn size) on one row, their merge
    groups on the next, the caption above and a legend below; at most ``max_frames`` frames, evenly spread.
    ``original`` ``[T, H, W, 3]``, ``drawn`` ``[T, H * s, W * s, 3]`` (from :func:`draw`)."""
    from PIL import Image, ImageDraw

    t, h, w, _ = drawn.shape
    frame_ids = list(range(0, t, -(-t // max_frames)))
    big = upscale(original, h // original.shape[1])
    gap, label_w, size = 4, 80, 14
    font, small = _font(size), _font(size - 2)
    line = _text_height(size)
    width = label_w + len(frame_ids) * (w + gap)
    lines = _wrap(caption, font, width - 8)
    top = line * (len(lines) + 1)
    entries = _legend_entries(fill, small, width)
    canvas = _canvas(width, top + 2 * (h + gap) + sum(len(e[1]) for e in entries) * line + 4)
    pen = ImageDraw.Draw(canvas)
    for k, text in enumerate(lines):
        pen.text((4, 2 + k * line), text, fill=(0, 0, 0), font=font)
    for i, f in enumerate(frame_ids):
        x = label_w + i * (w + gap)
        pen.text((x + 2, top - line + 4), f"frame {f}", fill=(60, 60, 60), font=small)
        canvas.paste(Image.fromarray(big[f]), (x, top))
        canvas.paste(Image.fromarray(drawn[f]), (x, top + h + gap))
    pen.text((4, top + h // 2 - size), "input", fill=(0, 0, 0), font=font)
    pen.text((4, top + h + gap + h // 2 - size), "merged\ntokens", fill=(0, 0, 0), font=font)
    _legend(canvas, 4, top + 2 * (h + gap), entries, small, line)
    return np.asarray(canvas)


def _legend_entries(fill: str, font: object, width: int) -> list[tuple[np.ndarray, list[str]]]:
    """The key: (icon, wrapped text lines) for a group and for a dropped patch."""
    swatch = np.full((12, 12, 3), 150, dtype=np.uint8)
    swatch[:, :2] = swatch[:, -2:] = swatch[:2] = swatch[-2:] = palette(2)[1].astype(np.uint8)
    dropped = np.full((12, 12, 3), 30, dtype=np.uint8)
    ys, xs = np.indices((12, 12))
    dropped[(ys + xs) % 8 < 2] = 90
    texts = ((swatch, KEYS[fill]), (dropped, "a dropped patch (drop and hybrid modes)"))
    return [(icon, _wrap(text, font, width - 26)) for icon, text in texts]


Entries = list[tuple[np.ndarray, list[str]]]


def _legend(canvas: object, x: int, y: int, entries: Entries, font: object, line: int) -> None:
    from PIL import Image, ImageDraw

    pen = ImageDraw.Draw(canvas)
    for icon, lines in entries:
        canvas.paste(Image.fromarray(icon), (x, y + 2))
        for text in lines:
            pen.text((x + 18, y), text, fill=(0, 0, 0), font=font)
            y += line


def save_visualization(
    original: np.ndarray,
    drawn: np.ndarray,
    out: str | Path,
    caption: str,
    name: str = "merges",
    fps: int = 4,
    fill: str = "mean",
) -> dict[str, Path]:
    """Write the merge picture (PNG, 256 colours: frames over their groups) and an animation (GIF and MP4: each
    frame next to its groups) under ``out``, each with the caption and a legend. ``original`` ``[T, H, W, 3]``,
    ``drawn`` ``[T, H * s, W * s, 3]`` drawn with ``fill``."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / f"{name}.png", "gif": out / f"{name}.gif", "mp4": out / f"{name}.mp4"}
    picture = Image.fromarray(compose(original, drawn, caption, fill))
    picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(paths["png"], optimize=True)
    panels = np.stack([_animation_frame(original, drawn, caption, i, fill) for i in range(len(drawn))])
    images = [Image.fromarray(p) for p in panels]
    images[0].save(paths["gif"], save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    write_video(paths["mp4"], panels, fps=fps)
    return paths


def _animation_frame(original: np.ndarray, drawn: np.ndarray, caption: str, i: int, fill: str) -> np.ndarray:
    """One animation frame: frame ``i`` and its groups side by side, the caption above, a legend below."""
    from PIL import Image, ImageDraw

    h, w = drawn.shape[1:3]
    gap, size = 8, 13
    font, small = _font(size), _font(size - 2)
    line = _text_height(size)
    width = max(2 * w + gap, 360)
    lines = _wrap(caption, font, width - 8)
    entries = _legend_entries(fill, small, width)
    top = line * (len(lines) + 1)
    canvas = _canvas(width, top + h + sum(len(e[1]) for e in entries) * line + 8)
    pen = ImageDraw.Draw(canvas)
    for k, text in enumerate(lines):
        pen.text((4, 2 + k * line), text, fill=(0, 0, 0), font=font)
    pen.text((4, top - line + 2), f"frame {i}: input", fill=(60, 60, 60), font=font)
    pen.text((w + gap + 4, top - line + 2), "merged tokens", fill=(60, 60, 60), font=font)
    canvas.paste(Image.fromarray(upscale(original, h // original.shape[1])[i]), (0, top))
    canvas.paste(Image.fromarray(drawn[i]), (w + gap, top))
    _legend(canvas, 4, top + h + 4, entries, small, line)
    return np.asarray(canvas)


def _wrap(text: str, font: object, width: int) -> list[str]:
    from PIL import ImageDraw

    pen = ImageDraw.Draw(_canvas(1, 1))
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and pen.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def visualize(
    path: str | Path,
    model_name: str,
    out: str | Path,
    layer: int | None = None,
    fill: str = "mean",
    **patch_kwargs: object,
) -> dict[str, Path]:
    """``vtome visualize``: load, merge, draw and save (PNG, GIF, MP4); returns the written files."""
    from vtome.zoo import load_model, model_source

    model = load_model(model_name)
    clip = load_clip(path, preprocess_for(model, model_source(model_name)))
    scale = display_scale(adapter_for(model).token_positions(model)[2])
    frames, groups = visualize_clip(model, clip, layer, fill, scale, **patch_kwargs)
    caption = describe(model, Path(str(model_name)).name, groups, layer, **patch_kwargs)
    return save_visualization(clip.display, frames, out, caption)

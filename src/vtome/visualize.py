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
from vtome.data.video import list_frames, read_frames, read_video, segment_indices, write_video
from vtome.merger import CapWarning


@dataclass
class Clip:
    pixel_values: torch.Tensor  # [1, T, C, H, W], normalised for the model
    display: np.ndarray  # [T, H, W, 3] uint8, the same frames as seen by the model (resized, cropped)


def load_clip(path: str | Path, pre: Preprocess) -> Clip:
    """Frames of a video file or frame folder, spread over its length, as the model sees them."""
    path = Path(path)
    if path.is_file():
        video = read_video(path)
        frames = video[segment_indices(len(video), pre.num_frames)]
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
            raise ValueError(f"--layer must be in [0, {layers - 1}]; got {layer}")
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


def draw(display: np.ndarray, labels: np.ndarray, patch: int, fill: str = "mean") -> np.ndarray:
    """Frames with merge groups drawn: ``display`` ``[T, H, W, 3]``, ``labels`` ``[T, h, w]`` -> ``[T, H, W, 3]``."""
    pix = labels.repeat(patch, axis=1).repeat(patch, axis=2)  # [T, H, W]
    h, w = display.shape[1:3]
    pix = pix[:, :h, :w]
    ids, inverse = np.unique(pix, return_inverse=True)
    inverse = inverse.reshape(pix.shape)
    flat = display.reshape(-1, 3).astype(np.float64)
    sums = np.zeros((len(ids), 3))
    np.add.at(sums, inverse.reshape(-1), flat)
    counts = np.bincount(inverse.reshape(-1), minlength=len(ids))[:, None]
    means = sums / np.maximum(counts, 1)
    out = means[inverse] if fill == "mean" else display.astype(np.float64)
    dropped = pix < 0
    out[dropped] = out[dropped] * 0.25
    colours = palette(int(ids.max()) + 1 if ids.max() >= 0 else 1)
    edge = np.zeros_like(pix, dtype=bool)
    edge[:, :-1, :] |= pix[:, :-1, :] != pix[:, 1:, :]
    edge[:, 1:, :] |= pix[:, 1:, :] != pix[:, :-1, :]
    edge[:, :, :-1] |= pix[:, :, :-1] != pix[:, :, 1:]
    edge[:, :, 1:] |= pix[:, :, 1:] != pix[:, :, :-1]
    edge &= ~dropped
    out[edge] = colours[pix[edge]]
    return out.clip(0, 255).astype(np.uint8)


def visualize_clip(
    model: nn.Module, clip: Clip, layer: int | None = None, fill: str = "mean", **patch_kwargs: object
) -> tuple[np.ndarray, torch.Tensor]:
    """Drawn frames ``[T, H, W, 3]`` and the group of each input token, for ``model`` merging as asked."""
    if fill not in ("mean", "pixels"):
        raise ValueError(f"--fill must be mean or pixels; got {fill!r}")
    groups = groups_after_layer(model, clip.pixel_values, layer, **patch_kwargs)
    positions, tubelet, patch = adapter_for(model).token_positions(model)
    side = clip_shape(model)[2] // patch
    labels = label_maps(groups, positions, tubelet, clip.display.shape[0], side)
    return draw(clip.display, labels, patch, fill), groups


def save_frames(frames: np.ndarray, out: str | Path, name: str = "merges", fps: int = 4) -> dict[str, Path]:
    """Write ``frames`` ``[T, H, W, 3]`` as a PNG grid, an animated GIF and an MP4 under ``out``."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    cols = min(t, 8)
    rows = -(-t // cols)
    gap = 2
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = frame
    paths = {"png": out / f"{name}.png", "gif": out / f"{name}.gif", "mp4": out / f"{name}.mp4"}
    Image.fromarray(grid).save(paths["png"])
    images = [Image.fromarray(f) for f in frames]
    images[0].save(paths["gif"], save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    write_video(paths["mp4"], frames, fps=fps)
    return paths


def visualize(
    path: str | Path,
    model_name: str,
    out: str | Path,
    layer: int | None = None,
    fill: str = "mean",
    **patch_kwargs: object,
) -> dict[str, Path]:
    """``vtome visualize``: load, merge, draw and save; returns the written files."""
    from vtome.zoo import load_model, model_source

    model = load_model(model_name)
    clip = load_clip(path, preprocess_for(model, model_source(model_name)))
    frames, _ = visualize_clip(model, clip, layer, fill, **patch_kwargs)
    return save_frames(frames, out)

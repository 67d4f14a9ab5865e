"""Preprocessing taken from the model: frames, resize, crop, mean/std (image processor JSON when present)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vtome.adapters.inputs import clip_shape

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The Hugging Face processors' defaults per architecture, used when a model has no processor file.
_FAMILY_DEFAULTS = {
    "videomae": (IMAGENET_MEAN, IMAGENET_STD),
    "vivit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "timesformer": ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),
    "motionformer": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the official configs' DATA.MEAN / STD
    "vjepa2": (IMAGENET_MEAN, IMAGENET_STD),
}
# Short side before the centre crop, as a multiple of the crop, where a family's processor is not 1:1.
_RESIZE_RATIO = {"vjepa2": 256 / 224}
_PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Preprocess:
    """Frames ``[T, H, W, 3]`` uint8 -> ``[T, 3, crop, crop]`` float: short side resized to ``resize``,
    cropped to ``crop`` (``position`` 0..1 along the long side: 0.5 is the centre), normalised."""

    num_frames: int
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, frames: np.ndarray, position: float = 0.5) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top = round((size[0] - self.crop) * (position if size[0] > size[1] else 0.5))
        left = round((size[1] - self.crop) * (position if size[1] >= size[0] else 0.5))
        x = x[:, :, top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def preprocess_for(model: torch.nn.Module, source: str | os.PathLike | None = None) -> Preprocess:
    """Preprocessing for ``model``: frame count and crop from its config; resize and mean/std from the
    image processor JSON in ``source`` (a model directory) when there is one, else the family's defaults."""
    config = model.config
    frames, _, crop = clip_shape(model)
    mean, std = _FAMILY_DEFAULTS.get(config.model_type, (IMAGENET_MEAN, IMAGENET_STD))
    resize = int(crop * _RESIZE_RATIO.get(config.model_type, 1.0))
    processor = _processor_json(source)
    if processor:
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
        size = processor.get("size") or {}
        resize = size.get("shortest_edge", size.get("height", resize)) if isinstance(size, dict) else int(size)
        if processor.get("offset") and processor.get("rescale_factor", 1 / 255) == 1 / 127.5:
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViViT: rescale to [-1, 1]
    return Preprocess(frames, int(resize), int(crop), tuple(mean), tuple(std))


def _processor_json(source: str | os.PathLike | None) -> dict:
    if source is None or not Path(source).is_dir():
        return {}
    for name in _PROCESSOR_FILES:
        path = Path(source) / name
        if path.exists():
            return json.loads(path.read_text())
    return {}

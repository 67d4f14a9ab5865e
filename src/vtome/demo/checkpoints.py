"""The two small demo classifiers: their configs, and the bundled trained weights as built-in model names.

- ``demo-joint``: VideoMAE architecture (joint space-time attention, spatio-temporal merging),
  16 frames x 96 px, 16 px patches, tubelet 2: 8 x 36 = 288 tokens, mean pooling.
- ``demo-divided``: TimeSformer architecture (divided space-time attention, per-frame merging),
  8 frames x 96 px, 16 px patches: 8 x 36 tokens + class token.

Both: hidden size 128, 4 layers, 4 heads, 15 classes (5 appearance + 10 temporal, see ``synth``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from vtome import zoo
from vtome.demo.synth import CLASSES

WEIGHTS = Path(__file__).parent / "weights"
FAMILIES = {"joint": "demo-joint", "divided": "demo-divided"}
_DIMS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=96)


def build(family: str, **overrides: object) -> nn.Module:
    """An untrained demo model of ``family`` (``joint`` or ``divided``); ``overrides`` change the config."""
    from transformers import (
        TimesformerConfig,
        TimesformerForVideoClassification,
        VideoMAEConfig,
        VideoMAEForVideoClassification,
    )

    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    kw = {**_DIMS, **labels, **overrides}
    if family == "joint":
        config = VideoMAEConfig(patch_size=16, num_frames=16, tubelet_size=2, use_mean_pooling=True, **kw)
        return VideoMAEForVideoClassification(config)
    if family == "divided":
        config = TimesformerConfig(patch_size=16, num_frames=8, attention_type="divided_space_time", **kw)
        model = TimesformerForVideoClassification(config)
        # Frame order reaches a TimeSformer only through its time embeddings, which start at zero; a
        # sinusoidal start (as VideoMAE's fixed table) lets it tell "left" from "right" from the first step.
        with torch.no_grad():
            model.timesformer.embeddings.time_embeddings.copy_(_sinusoid(config.num_frames, config.hidden_size))
        return model
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")


def write_processor_config(out: Path, size: int) -> None:
    """The preprocessing the demo models were trained with (pixels in [-1, 1]), for ``vtome eval``/``visualize``."""
    config = {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _sinusoid(positions: int, dim: int) -> torch.Tensor:
    """``[1, positions, dim]`` sine/cosine position table."""
    pos = torch.arange(positions, dtype=torch.float32)[:, None]
    rate = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) * (torch.log(torch.tensor(10000.0)) / dim))
    table = torch.zeros(positions, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * rate), torch.cos(pos * rate)
    return table[None]


def weights_dir(family: str) -> Path:
    return WEIGHTS / family


def load(family: str) -> nn.Module:
    """The bundled trained model of ``family``."""
    path = weights_dir(family)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no bundled weights for demo-{family} at {path}; train them with "
            f"`python -m vtome.demo.train --family {family} --out {path}`"
        )
    return zoo.load_model(str(path), attn=None)


def training_record(family: str) -> dict:
    """How the bundled weights were made (command, seed, accuracy), from ``training.json``."""
    return json.loads((weights_dir(family) / "training.json").read_text())


for _family, _name in FAMILIES.items():
    zoo.register(
        _name,
        lambda family=_family: load(family),
        f"bundled demo classifier ({'VideoMAE' if _family == 'joint' else 'TimeSformer'} architecture, "
        "trained on generated clips)",
        source=str(weights_dir(_family)),
    )

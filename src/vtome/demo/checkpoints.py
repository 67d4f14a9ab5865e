"""The small demo classifiers: their configs, and the bundled trained weights as built-in model names.

- ``demo-joint``: VideoMAE architecture (joint space-time attention, spatio-temporal merging),
  16 frames x 96 px, 16 px patches, tubelet 2: 8 x 36 = 288 tokens, mean pooling.
- ``demo-divided``: TimeSformer architecture (divided space-time attention, per-frame merging),
  8 frames x 96 px, 16 px patches: 8 x 36 tokens + class token.

- ``demo-vjepa2``: V-JEPA 2 architecture (joint space-time attention with 3-D rotary positions and no
  position embedding, attentive pooler with 1 self-attention layer), 16 frames x 96 px, 16 px patches,
  tubelet 2: 288 tokens. Its predictor (unused by the classifier) is kept minimal.

All: 4 layers, 4 heads, hidden size 128 (V-JEPA 2: 96), 15 classes (5 appearance + 10 temporal, see
``synth``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from vtome import zoo
from vtome.demo.synth import CLASSES

WEIGHTS = zoo.DEMO_WEIGHTS  # each folder is the built-in model "demo-<folder>"
FAMILIES = {"joint": "demo-joint", "divided": "demo-divided"}
# Every bundled model (``vtome demo`` runs FAMILIES; the V-JEPA 2 model has its own measurement script,
# ``python -m vtome.demo.vjepa2_positions``).
ALL_FAMILIES = {**FAMILIES, "vjepa2": "demo-vjepa2"}
_CLOCK = 4.0  # amplitude of the demo TimeSformer's initial clock channels
_DIMS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=96)
_VJEPA2_DIMS = dict(hidden_size=96, intermediate_size=384)


def build(family: str, **overrides: object) -> nn.Module:
    """An untrained demo model of ``family`` (``joint``, ``divided`` or ``vjepa2``); ``overrides`` change the
    config (for ``vjepa2``, ``image_size``/``num_frames``/``intermediate_size`` are translated)."""
    from transformers import (
        TimesformerConfig,
        TimesformerForVideoClassification,
        VideoMAEConfig,
        VideoMAEForVideoClassification,
    )

    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    if family == "vjepa2":  # narrower (a pooler on top, weights within the demo's size budget)
        return _build_vjepa2({**_DIMS, **_VJEPA2_DIMS, **labels, **overrides})
    kw = {**_DIMS, **labels, **overrides}
    if family == "joint":
        config = VideoMAEConfig(patch_size=16, num_frames=16, tubelet_size=2, use_mean_pooling=True, **kw)
        return VideoMAEForVideoClassification(config)
    if family == "divided":
        config = TimesformerConfig(**{"patch_size": 16, "num_frames": 8, "attention_type": "divided_space_time", **kw})
        model = TimesformerForVideoClassification(config)
        # Frame order and patch position reach a TimeSformer only through its time and position embeddings,
        # which start at (nearly) zero; without an ImageNet start the model then cannot tell where the object
        # is nor when. Fixed-table starts give it both from the first step: a clock (frame t lights channel t,
        # channels the pixels do not write to at first) and a 2-D sinusoidal table over the patch grid (as MAE's)
        # in the other channels.
        emb = model.timesformer.embeddings
        grid, frames = config.image_size // config.patch_size, config.num_frames
        clock = config.hidden_size // config.num_attention_heads  # one head's worth of channels
        if frames > clock:
            raise ValueError(f"the demo init needs num_frames <= hidden_size / num_attention_heads; got {frames}")
        with torch.no_grad():
            emb.time_embeddings.zero_()
            emb.time_embeddings[0, :, :frames] = _CLOCK * torch.eye(frames)
            emb.position_embeddings.zero_()
            emb.position_embeddings[:, 1:, clock:] = _sinusoid_2d(grid, config.hidden_size - clock)
            emb.patch_embeddings.projection.weight[:clock] = 0.0
            emb.patch_embeddings.projection.bias[:clock] = 0.0
        _local_temporal_init(model)
        return model
    raise ValueError(f"family must be one of {', '.join(ALL_FAMILIES)}; got {family!r}")


def _build_vjepa2(kw: dict) -> nn.Module:
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    kw = dict(kw)
    kw["crop_size"] = kw.pop("image_size")
    kw["mlp_ratio"] = kw.pop("intermediate_size") / kw["hidden_size"]
    if "num_frames" in kw:
        kw["frames_per_clip"] = kw.pop("num_frames")
    predictor = dict(pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=1, pred_num_mask_tokens=1)
    config = VJEPA2Config(
        **{"patch_size": 16, "frames_per_clip": 16, "tubelet_size": 2, "num_pooler_layers": 1, **predictor, **kw}
    )
    return VJEPA2ForVideoClassification(config)


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


def _local_temporal_init(model: nn.Module, offsets: tuple[int, ...] = (-1, 1), margin: float = 8.0) -> None:
    """Locality initialisation of a TimeSformer's first temporal attention (after ConViT, d'Ascoli et al.
    2021): head ``h`` starts attending to frame ``t + offsets[h]`` by reading the clock channels of the time
    embeddings, and the value path starts at unit gain, so the first layer sees each patch's motion (as a
    2-frame tubelet does). Needs the clock set by ``build``.

    Trained from scratch without it, a TimeSformer learnt the axis of motion but not its direction in our
    budget (left vs right stayed at chance); with it, direction is learnt in a few hundred steps.
    """
    config = model.config
    dim, frames = config.hidden_size, config.num_frames
    head_dim = dim // config.num_attention_heads
    layer = model.timesformer.encoder.layer[0]
    qkv = layer.temporal_attention.attention.qkv
    # key(t') = clock(t'), query(t) = clock(t + offset) scaled so that the logit of frame t + offset leads by ~margin
    gain = margin / (_CLOCK**2 * head_dim**-0.5)
    with torch.no_grad():
        for h, offset in enumerate(offsets):
            query, key = torch.zeros(head_dim, dim), torch.zeros(head_dim, dim)
            for t in range(frames):
                key[t, t] = 1.0
                if 0 <= t + offset < frames:
                    query[t + offset, t] = gain
            for rows, weight in ((h * head_dim, query), (dim + h * head_dim, key)):
                qkv.weight[rows : rows + head_dim], qkv.bias[rows : rows + head_dim] = weight, 0.0
        value_path = (qkv.weight[2 * dim :], layer.temporal_attention.output.dense.weight, layer.temporal_dense.weight)
        for weight in value_path:
            nn.init.normal_(weight, std=dim**-0.5)


def _sinusoid_2d(grid: int, dim: int) -> torch.Tensor:
    """``[1, grid * grid, dim]`` table for a row-major patch grid: rows in the first half of the channels,
    columns in the second."""
    rows = _sinusoid(grid, dim // 2)[0]
    cols = _sinusoid(grid, dim - dim // 2)[0]
    return torch.cat([rows[:, None].expand(grid, grid, -1), cols[None].expand(grid, grid, -1)], -1).reshape(1, -1, dim)


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

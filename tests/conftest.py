"""Tiny models built from configs (no downloads) shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    TimesformerConfig,
    TimesformerForVideoClassification,
    VideoMAEConfig,
    VideoMAEForVideoClassification,
    VivitConfig,
    VivitForVideoClassification,
)

COMMON = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_labels=5)
FAMILIES = ("videomae", "vivit", "timesformer")
ALL_FAMILIES = (*FAMILIES, "motionformer")


def tiny(family: str, attn: str = "sdpa", image_size: int = 64, **overrides: object) -> torch.nn.Module:
    """A 3-layer model of ``family``: 64 px, 16 px patches; VideoMAE/ViViT 8 frames (tubelet 2), TimeSformer 4,
    Motionformer 4 (tubelet 2)."""
    torch.manual_seed(0)
    kw = {**COMMON, "image_size": image_size, **overrides}
    if family == "videomae":
        model = VideoMAEForVideoClassification(VideoMAEConfig(patch_size=16, num_frames=8, tubelet_size=2, **kw))
    elif family == "vivit":
        model = VivitForVideoClassification(VivitConfig(tubelet_size=[2, 16, 16], num_frames=8, **kw))
    elif family == "timesformer":
        model = TimesformerForVideoClassification(TimesformerConfig(patch_size=16, num_frames=4, **kw))
        attn = "eager"  # TimeSformer has no attention dispatch
    elif family == "motionformer":
        from vtome.architectures.motionformer import MotionformerConfig, MotionformerForVideoClassification

        kw.pop("intermediate_size")
        model = MotionformerForVideoClassification(MotionformerConfig(patch_size=16, num_frames=4, **kw))
        return model.eval()  # our own model: one attention implementation
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    return model.eval()


def clip(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_frames, 3, cfg.image_size, cfg.image_size, generator=g)


def input_tokens(model: torch.nn.Module) -> int:
    """Tokens entering the first layer (class token included)."""
    cfg = model.config
    grid = (cfg.image_size // 16) ** 2
    if type(model).__name__.startswith("Timesformer"):
        return 1 + grid * cfg.num_frames
    cls = 1 if type(model).__name__.startswith(("Vivit", "Motionformer")) else 0
    return cls + grid * cfg.num_frames // 2


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param

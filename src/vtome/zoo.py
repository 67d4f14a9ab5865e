"""Built-in model names, local checkpoint directories and hub ids -> a ready model (tools use this)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

# name -> (transformers class name, config class name, config overrides, description)
_BUILTIN: dict[str, tuple[str, str, dict, str]] = {
    "videomae-base": (
        "VideoMAEForVideoClassification",
        "VideoMAEConfig",
        {"num_labels": 400},
        "VideoMAE-B, 16 frames x 224 px, tubelet 2: 1568 tokens, mean pooling (random weights)",
    ),
    "vivit-base": (
        "VivitForVideoClassification",
        "VivitConfig",
        {"num_labels": 400},
        "ViViT-B 16x2, 32 frames x 224 px: 3136 tokens + class token (random weights)",
    ),
    "timesformer-base": (
        "TimesformerForVideoClassification",
        "TimesformerConfig",
        {"num_labels": 400},
        "TimeSformer-B divided space-time, 8 frames x 224 px: 8 x 196 tokens + class token (random weights)",
    ),
    "vjepa2-large": (
        "VJEPA2ForVideoClassification",
        "VJEPA2Config",
        {"frames_per_clip": 16, "crop_size": 256, "num_labels": 174},
        "V-JEPA 2 ViT-L (as vjepa2-vitl-fpc16-256-ssv2), 16 frames x 256 px, tubelet 2: 2048 tokens, 3-D RoPE, "
        "attentive pooler with 3 self-attention layers (random weights)",
    ),
}

# The bundled demo classifiers: every folder under demo/weights holding a config.json is the built-in
# "demo-<folder>" (found on disk, so this module imports nothing from the demo package).
DEMO_WEIGHTS = Path(__file__).parent / "demo" / "weights"
_MOTIONFORMER = "Motionformer-B 16x4, 16 frames x 224 px, tubelet 2: 8 x 196 tokens + class token (random weights)"


def _demo_models() -> dict[str, Path]:
    """``demo-<family>`` -> its weights folder, for each bundled demo model."""
    if not DEMO_WEIGHTS.is_dir():
        return {}
    return {f"demo-{d.name}": d for d in sorted(DEMO_WEIGHTS.iterdir()) if (d / "config.json").is_file()}


def model_source(name_or_path: str) -> str | None:
    """The directory a model name loads from (local checkpoints and bundled demo models), else None."""
    demos = _demo_models()
    if name_or_path in demos:
        return str(demos[name_or_path])
    return name_or_path if os.path.isdir(name_or_path) else None


def builtin_names() -> dict[str, str]:
    """Built-in names with a one-line description each."""
    names = {k: v[3] for k, v in _BUILTIN.items()}
    names["motionformer-base"] = _MOTIONFORMER
    for name, path in _demo_models().items():
        arch = json.loads((path / "config.json").read_text()).get("architectures", ["?"])[0]
        names[name] = f"bundled demo classifier ({arch}, trained on generated clips)"
    return names


def load_model(name_or_path: str, attn: str | None = "sdpa") -> nn.Module:
    """A model in eval mode from a built-in name, a local ``save_pretrained`` directory, or a hub id.

    ``attn`` picks the attention backend where the family has a choice (``sdpa`` or ``eager``);
    TimeSformer has only its own attention and ignores it.
    """
    import transformers

    name_or_path = str(_demo_models().get(name_or_path, name_or_path))  # a bundled demo model is a directory
    if name_or_path in _BUILTIN:
        cls_name, cfg_name, overrides, _ = _BUILTIN[name_or_path]
        model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**overrides))
    elif name_or_path == "motionformer-base":
        from vtome.architectures.motionformer import MotionformerForVideoClassification

        model = MotionformerForVideoClassification()
    elif name_or_path.endswith((".pyth", ".pth", ".pt")) and os.path.isfile(name_or_path):
        from vtome.architectures.motionformer import load_official

        model = load_official(name_or_path)
    elif os.path.isdir(name_or_path):
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        model = _class_for(config, name_or_path).from_pretrained(name_or_path)
    elif "/" not in name_or_path or name_or_path.startswith((".", "/", "~")):
        raise ValueError(f"unknown model {name_or_path!r}: not a built-in name or a directory. {_choices()}")
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(name_or_path)
        except OSError as err:
            raise ValueError(
                f"model {name_or_path!r} is not a local directory and the hub could not provide it "
                f"({err.__class__.__name__}). {_choices()}"
            ) from None
        model = _class_for(config, name_or_path).from_pretrained(name_or_path)
    if attn is not None and getattr(model, "_supports_sdpa", False):
        model.set_attn_implementation(attn)
    return model.eval()


def load_config(name_or_path: str) -> object | None:
    """The config of a built-in name or local directory without building the model; None for others."""
    import transformers

    if name_or_path in _BUILTIN:
        _, cfg_name, overrides, _ = _BUILTIN[name_or_path]
        return getattr(transformers, cfg_name)(**overrides)
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "config.json")):
        try:
            return transformers.AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError):
            return None
    return None


def _choices() -> str:
    return (
        "Built-in names: " + ", ".join(builtin_names()) + "; or a directory written by save_pretrained, "
        "or an official Motionformer .pyth checkpoint."
    )


def _class_for(config: object, where: str) -> type:
    import transformers

    from vtome.adapters import REGISTRY

    names = list(getattr(config, "architectures", None) or [])
    names += [n for n in REGISTRY if n.lower().startswith(config.model_type) and "ForVideo" in n]
    for name in names:
        if name in REGISTRY:
            return getattr(transformers, name)
    raise ValueError(f"{where}: model type {config.model_type!r} is not supported; supported: {', '.join(REGISTRY)}")

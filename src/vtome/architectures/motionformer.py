"""Motionformer (Patrick et al., NeurIPS 2021, "Keeping Your Eye on the Ball"): a video ViT with
trajectory attention, written from the paper and the public description of the official models, plus
loading of the official ``.pyth`` checkpoints (K400, SSv2, EPIC-KITCHENS-100, 16x4).

Tokens: a class token, then ``F`` temporal positions x ``P`` patches, time-major (``1 + f*P + p``), from a
``2 x 16 x 16`` tubelet embedding of 16 frames at 224 px (F = 8, P = 196). Trajectory attention, full
version (the approximations orthoformer / nystrom / performer are not implemented):

1. the class token attends to every token;
2. each patch query attends over the patches of *each* frame separately (a softmax per frame), giving
   one trajectory point per frame;
3. a temporal attention along that trajectory, its query projected from the point in the query's own
   frame. As in the official code (``USE_ORIGINAL_TRAJ_ATTN_CODE=True``, the released models), the
   values of this step are the trajectory points themselves, not their projection.

Inputs are ``pixel_values`` ``[B, T, C, H, W]`` like the Hugging Face models; outputs carry ``logits``
(pre-softmax; for EPIC-KITCHENS the verb logits followed by the noun logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

PRESETS = {"k400": [400], "ssv2": [174], "epic": [97, 300]}


@dataclass
class MotionformerConfig:
    """Motionformer-B by default (the official 16x4 models)."""

    num_labels: int | list[int] = 400  # a list for several heads (EPIC-KITCHENS: [97, 300])
    image_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    num_frames: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_mlp_head: bool = True  # tanh pre-logits layer
    original_trajectory_values: bool = True
    layer_norm_eps: float = 1e-6
    model_type: str = "motionformer"

    @property
    def temporal_positions(self) -> int:
        return self.num_frames // self.tubelet_size

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **overrides: object) -> MotionformerConfig:
        if name not in PRESETS:
            raise ValueError(f"Motionformer preset must be one of {', '.join(PRESETS)}; got {name!r}")
        labels = PRESETS[name]
        overrides.setdefault("num_labels", labels[0] if len(labels) == 1 else list(labels))
        return cls(**overrides)


@dataclass
class MotionformerOutput:
    logits: Tensor  # [B, classes] (heads concatenated)


torch.export.register_dataclass(MotionformerOutput, serialized_type_name=f"{__name__}.MotionformerOutput")


class TrajectoryAttention(nn.Module):
    """Trajectory attention over ``[B, 1 + F*P, C]`` tokens; ``bias`` (``[B, 1, 1, 1 + F*P]``, log token sizes)
    adds proportional attention to the class token's and the per-frame spatial softmaxes."""

    def __init__(self, config: MotionformerConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = c // self.num_heads
        self.scale = self.head_dim**-0.5
        self.original_values = config.original_trajectory_values
        self.qkv = nn.Linear(c, 3 * c, bias=config.qkv_bias)
        self.proj_q = nn.Linear(c, c, bias=config.qkv_bias)
        self.proj_kv = nn.Linear(c, 2 * c, bias=config.qkv_bias)
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor, frames: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the output ``[B, N, C]`` and the keys ``[B, h, N, d]`` (the merging metric)."""
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        p = (n - 1) // frames
        q, k, v = self.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, h, N, d]

        # 1. class token over all tokens
        cls_logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # [B, h, 1, N]
        if bias is not None:
            cls_logits = cls_logits + bias
        cls_out = (cls_logits.softmax(-1) @ v).transpose(1, 2).reshape(b, 1, c)

        # 2. each patch query over the patches of every frame, a softmax per frame
        q_, k_, v_ = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]
        logits = (self.scale * (q_ @ k_.transpose(-2, -1))).view(b, h, frames * p, frames, p)
        if bias is not None:
            logits = logits + bias[..., 1:].view(b, 1, 1, frames, p)
        points = torch.einsum("bhqfp,bhfpd->bhqfd", logits.softmax(-1), v_.view(b, h, frames, p, d))
        points = points.permute(0, 2, 3, 1, 4).reshape(b, frames * p, frames, c)  # [B, S, F, C]

        # 3. attention along each query's trajectory, queried from the point in its own frame
        own = points.view(b, frames, p, frames, c).diagonal(dim1=1, dim2=3)  # [B, P, C, F]
        own = own.permute(0, 3, 1, 2).reshape(b, frames * p, c)
        q2 = self.proj_q(own).view(b, frames * p, h, d).transpose(1, 2) * self.scale  # [B, h, S, d]
        k2, v2 = self.proj_kv(points).view(b, frames * p, frames, 2, h, d).permute(3, 0, 4, 1, 2, 5)
        weights = torch.einsum("bhsd,bhsfd->bhsf", q2, k2).softmax(-1)
        values = points.view(b, frames * p, frames, h, d).permute(0, 3, 1, 2, 4) if self.original_values else v2
        out = torch.einsum("bhsf,bhsfd->bhsd", weights, values).transpose(1, 2).reshape(b, frames * p, c)
        return self.proj(torch.cat([cls_out, out], dim=1)), k


class MotionformerMLP(nn.Module):
    def __init__(self, config: MotionformerConfig) -> None:
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MotionformerLayer(GradientCheckpointingLayer):
    """Pre-LN block: trajectory attention, then the MLP. Checkpointed like a Hugging Face layer once the
    model's ``gradient_checkpointing_enable()`` is called."""

    def __init__(self, config: MotionformerConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = TrajectoryAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MotionformerMLP(config)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        x = x + self.attention(self.layernorm_before(x), frames)[0]
        return x + self.mlp(self.layernorm_after(x))


class MotionformerEmbeddings(nn.Module):
    def __init__(self, config: MotionformerConfig) -> None:
        super().__init__()
        c, t = config.hidden_size, config.tubelet_size
        self.projection = nn.Conv3d(
            config.num_channels,
            c,
            kernel_size=(t, config.patch_size, config.patch_size),
            stride=(t, config.patch_size, config.patch_size),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.patches_per_frame + 1, c))
        self.time_embeddings = nn.Parameter(torch.zeros(1, config.temporal_positions, c))
        for p in (self.cls_token, self.position_embeddings, self.time_embeddings):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.projection(pixel_values.transpose(1, 2)).flatten(2).transpose(1, 2)  # [B, F*P, C], time-major
        frames = self.time_embeddings.shape[1]
        patches = self.position_embeddings[:, 1:].repeat(1, frames, 1)
        times = self.time_embeddings.repeat_interleave(x.shape[1] // frames, dim=1)
        cls = self.cls_token.expand(x.shape[0], -1, -1) + self.position_embeddings[:, :1]
        return torch.cat([cls, x + patches + times], dim=1)


class MotionformerForVideoClassification(nn.Module):
    """Motionformer video classifier; ``forward(pixel_values [B, T, C, H, W]) -> .logits``."""

    def __init__(self, config: MotionformerConfig | None = None) -> None:
        super().__init__()
        self.config = config or MotionformerConfig()
        c = self.config
        self.embeddings = MotionformerEmbeddings(c)
        self.layers = nn.ModuleList([MotionformerLayer(c) for _ in range(c.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.pre_logits = nn.Linear(c.hidden_size, c.hidden_size) if c.use_mlp_head else None
        heads = c.num_labels if isinstance(c.num_labels, list) else [c.num_labels]
        self.classifiers = nn.ModuleList([nn.Linear(c.hidden_size, n) for n in heads])
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias) if m.bias is not None else None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self.layers)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer in the backward pass instead of storing its activations (as in transformers;
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``, default reentrant)."""
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        for layer in self.layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = False

    def forward(self, pixel_values: Tensor) -> MotionformerOutput:
        x = self.embeddings(pixel_values)
        frames = self.config.temporal_positions
        for layer in self.layers:
            x = layer(x, frames)
        return self.head(x)

    def head(self, x: Tensor) -> MotionformerOutput:
        """Class-token classifier on the last layer's tokens ``[B, N, C]``."""
        x = self.layernorm(x)[:, 0]
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        return MotionformerOutput(torch.cat([head(x) for head in self.classifiers], dim=-1))


# -- official checkpoints ------------------------------------------------------------------------------

_OFFICIAL_TOP = {
    "patch_embed_3d.proj.weight": "embeddings.projection.weight",
    "patch_embed_3d.proj.bias": "embeddings.projection.bias",
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "temp_embed": "embeddings.time_embeddings",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "pre_logits.fc.weight": "pre_logits.weight",
    "pre_logits.fc.bias": "pre_logits.bias",
    "head.weight": "classifiers.0.weight",
    "head.bias": "classifiers.0.bias",
    "head0.weight": "classifiers.0.weight",
    "head0.bias": "classifiers.0.bias",
    "head1.weight": "classifiers.1.weight",
    "head1.bias": "classifiers.1.bias",
}
_OFFICIAL_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.qkv": "attention.qkv",
    "attn.proj_q": "attention.proj_q",
    "attn.proj_kv": "attention.proj_kv",
    "attn.proj": "attention.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# In the official state dict but unused by the 16x4 models (the 2D patch embedding of image models).
_OFFICIAL_UNUSED = ("patch_embed.proj.weight", "patch_embed.proj.bias")


def official_to_ours(name: str) -> str | None:
    """Our parameter name for an official one (None for parameters the model does not use)."""
    name = name.removeprefix("module.")
    if name in _OFFICIAL_UNUSED:
        return None
    if name in _OFFICIAL_TOP:
        return _OFFICIAL_TOP[name]
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        for old, new in _OFFICIAL_BLOCK.items():
            if rest.startswith(old + "."):
                return f"layers.{index}.{new}{rest[len(old) :]}"
    raise KeyError(name)


def ours_to_official(state: dict[str, Tensor], heads: int = 1) -> dict[str, Tensor]:
    """Our state dict renamed to the official layout (the inverse of :func:`official_to_ours`)."""
    inverse = {v: k for k, v in _OFFICIAL_TOP.items() if not (heads == 1 and k.startswith("head0"))}
    if heads > 1:
        inverse.update({"classifiers.0.weight": "head0.weight", "classifiers.0.bias": "head0.bias"})
    out = {}
    for name, value in state.items():
        if name in inverse:
            out[inverse[name]] = value
            continue
        _, index, rest = name.split(".", 2)
        old = next(o for o, n in _OFFICIAL_BLOCK.items() if rest.startswith(n + "."))
        out[f"blocks.{index}.{old}{rest[len(_OFFICIAL_BLOCK[old]) :]}"] = value
    return out


def load_official(
    path: str | Path, preset: str | None = None, **overrides: object
) -> MotionformerForVideoClassification:
    """A Motionformer from an official ``.pyth`` checkpoint (a dict with ``model_state``, or a bare state
    dict). The classes come from the checkpoint's classifier heads (the preset, k400 / ssv2 / epic, is
    inferred from them when not given). Missing or unexpected parameters and shape mismatches raise a
    ``ValueError`` that lists them all."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a Motionformer checkpoint (expected a dict with 'model_state')")
    for key, value in _dims_from_cfg(checkpoint.get("cfg")).items():
        overrides.setdefault(key, value)
    heads = {
        k.removeprefix("module."): v.shape[0]
        for k, v in state.items()
        if k.removeprefix("module.") in ("head.weight", "head0.weight", "head1.weight")
    }
    if not heads:
        raise ValueError(f"{path}: no classifier head ('head.weight' or 'head0/head1') in the checkpoint")
    sizes = [heads["head.weight"]] if "head.weight" in heads else [heads[k] for k in sorted(heads)]
    if preset is None:
        preset = "epic" if len(sizes) > 1 else {174: "ssv2"}.get(sizes[0], "k400")
    overrides.setdefault("num_labels", sizes[0] if len(sizes) == 1 else sizes)
    model = MotionformerForVideoClassification(MotionformerConfig.preset(preset, **overrides))
    load_official_state(model, state, str(path))
    return model.eval()


def _dims_from_cfg(cfg: object) -> dict:
    """Model dimensions from the YAML config the official training code stores in its checkpoints."""
    if not isinstance(cfg, str):
        return {}
    import yaml

    data = yaml.safe_load(cfg) or {}
    vit, video = data.get("VIT", {}), data.get("DATA", {})
    fields = {
        "hidden_size": vit.get("EMBED_DIM"),
        "num_hidden_layers": vit.get("DEPTH"),
        "num_attention_heads": vit.get("NUM_HEADS"),
        "patch_size": vit.get("PATCH_SIZE"),
        "tubelet_size": vit.get("PATCH_SIZE_TEMP"),
        "qkv_bias": vit.get("QKV_BIAS"),
        "use_mlp_head": vit.get("USE_MLP"),
        "original_trajectory_values": vit.get("USE_ORIGINAL_TRAJ_ATTN_CODE"),
        "mlp_ratio": vit.get("MLP_RATIO"),
        "image_size": video.get("TRAIN_CROP_SIZE"),
        "num_frames": video.get("NUM_FRAMES"),
    }
    if vit.get("ATTN_LAYER", "trajectory") != "trajectory":
        raise ValueError(f"only trajectory-attention Motionformers are supported; this one uses {vit['ATTN_LAYER']!r}")
    return {k: v for k, v in fields.items() if v is not None}


def load_official_state(model: MotionformerForVideoClassification, state: dict[str, Tensor], where: str = "") -> None:
    """Load an official-layout state dict into ``model``, reporting every mismatch at once."""
    ours = model.state_dict()
    mapped, unexpected, shapes, mismatched = {}, [], [], set()
    for name, value in state.items():
        try:
            target = official_to_ours(name)
        except KeyError:
            unexpected.append(name)
            continue
        if target is None:
            continue
        if target not in ours:
            unexpected.append(name)
        elif ours[target].shape != value.shape:
            shapes.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(ours[target].shape)}")
            mismatched.add(target)
        else:
            mapped[target] = value
    missing = sorted(set(ours) - set(mapped) - mismatched)

    def listed(items: list[str], sep: str = ", ") -> str:
        return sep.join(items[:6]) + (f"{sep}... and {len(items) - 6} more" if len(items) > 6 else "")

    problems = []
    if shapes:
        problems.append("shape mismatches: " + listed(shapes, "; "))
    if missing:
        problems.append("missing: " + listed(missing))
    if unexpected:
        problems.append("unexpected: " + listed(sorted(unexpected)))
    if problems:
        raise ValueError(
            f"{where or 'checkpoint'} does not fit this Motionformer config ({model.config.num_labels} "
            f"classes, {model.config.num_hidden_layers} layers): " + " | ".join(problems)
        )
    model.load_state_dict(mapped)

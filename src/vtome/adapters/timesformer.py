"""TimeSformer (Bertasius et al. 2021), divided space-time attention: merging inside each frame.

Tokens are ``[CLS] + (slot, frame)`` with the frame index minor. Every frame merges the same ``r`` tokens,
matched on the keys of the spatial attention, so the tokens stay a ``frames x slots`` grid and the
temporal attention (over the frames of each slot) keeps working. The stock layer reshapes with the
config's fixed patch grid, so the patched layer derives the grid from the current token count.
Proportional attention adds ``log(size)`` in both the temporal and the spatial attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.timesformer import modeling_timesformer as hf

from vtome.adapters import Adapter, check_input, grid_positions, merger_of, register_outputs, with_class_token
from vtome.layout import Layout
from vtome.merge import attention_bias
from vtome.merger import Merger, Track, encode

FAMILY = "TimeSformer"


# Copied from transformers.models.timesformer.modeling_timesformer.TimesformerSelfAttention.forward (5.x), with a
# bias and the keys returned
class TimesformerSelfAttention(hf.TimesformerSelfAttention):
    """Stock attention with an optional additive ``bias`` ``[G, 1, 1, N]`` on the logits; returns
    ``(context, probs or None, keys [G, H, N, d])`` (the keys are the merging metric)."""

    def forward(
        self, hidden_states: Tensor, output_attentions: bool = False, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        batch, tokens, channels = hidden_states.shape
        qkv = (
            self.qkv(hidden_states)
            .reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        query, key, value = qkv[0], qkv[1], qkv[2]
        logits = (query @ key.transpose(-2, -1)) * self.scale
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        probs = self.attn_drop(probs)
        context = (probs @ value).transpose(1, 2).reshape(batch, tokens, channels)
        return context, probs if output_attentions else None, key


def _attend(
    block: nn.Module, x: Tensor, bias: Tensor | None, output_attentions: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``TimeSformerAttention.forward`` with a bias passed to its self-attention; also returns the keys."""
    context, probs, keys = block.attention(x, output_attentions, bias)
    return block.output(context), probs, keys


# Copied from transformers.models.timesformer.modeling_timesformer.TimesformerLayer.forward (5.x), for any number
# of tokens per frame, with proportional attention and the merge step
class TimesformerLayer(hf.TimesformerLayer):
    """Divided space-time block for any number of tokens per frame, taking and returning
    ``(hidden_states, track)`` (then the attention probabilities if asked), merging per frame before the MLP."""

    def forward(self, hidden_states: Tensor, track: Track, output_attentions: bool = False) -> tuple:
        merger: Merger = merger_of(self)
        frames = self.config.num_frames
        batch, num_tokens, channels = hidden_states.shape
        slots = (num_tokens - 1) // frames
        prop = track.size if merger.settings.prop_attn else None

        # Temporal attention over the frames of each slot: [B*slots, T, C].
        patches = hidden_states[:, 1:, :]
        temporal = patches.reshape(batch * slots, frames, channels)
        bias = None if prop is None else attention_bias(prop[:, 1:, 0].reshape(batch * slots, frames), temporal.dtype)
        temporal_out = _attend(self.temporal_attention, self.temporal_layernorm(temporal), bias, False)[0]
        residual_temporal = self.drop_path(temporal_out).reshape(batch, slots * frames, channels)
        residual_temporal = self.temporal_dense(residual_temporal)
        temporal_embedding = patches + residual_temporal

        # Spatial attention inside each frame, class token repeated per frame: [B*T, 1 + slots, C].
        init_cls_token = hidden_states[:, 0, :].unsqueeze(1)
        cls_token = init_cls_token.repeat(1, frames, 1).reshape(batch * frames, 1, channels)
        spatial = temporal_embedding.reshape(batch, slots, frames, channels).permute(0, 2, 1, 3)
        spatial = torch.cat((cls_token, spatial.reshape(batch * frames, slots, channels)), 1)
        bias = None
        if prop is not None:
            frame_size = merger.layout.split(prop)[1].squeeze(-1)
            frame_size = torch.cat((frame_size.new_ones(batch * frames, 1), frame_size), 1)
            bias = attention_bias(frame_size, spatial.dtype)
        spatial_out, probs, keys = _attend(self.attention, self.layernorm_before(spatial), bias, output_attentions)
        residual_spatial = self.drop_path(spatial_out)
        cls_token = torch.mean(residual_spatial[:, 0, :].reshape(batch, frames, channels), 1, True)
        residual_spatial = residual_spatial[:, 1:, :].reshape(batch, frames, slots, channels).permute(0, 2, 1, 3)
        residual_spatial = residual_spatial.reshape(batch, slots * frames, channels)
        hidden_states = torch.cat((init_cls_token, temporal_embedding), 1) + torch.cat((cls_token, residual_spatial), 1)

        # Merge inside each frame on the spatial keys (class token left out: [B*T, heads, slots, d]), then the MLP.
        i = self._vtome_layer
        hidden_states, track = merger.merge(i, hidden_states, track, keys[:, :, 1:], grouped=True)
        layer_output = self.layernorm_after(hidden_states)
        layer_output = self.intermediate(layer_output)
        layer_output = self.output(layer_output)
        layer_output = hidden_states + self.drop_path(layer_output)
        return (layer_output, track) + ((probs,) if output_attentions else ())


class TimesformerEncoder(hf.TimesformerEncoder):
    """The stock layer loop, carrying the track."""

    def forward(
        self,
        hidden_states: Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> tuple | BaseModelOutput:
        all_hidden_states: list[Tensor] = []
        all_attentions: list[Tensor] = []

        def collect(layer_input: Tensor, layer_output: tuple) -> None:
            all_hidden_states.append(layer_input)
            if output_attentions:
                all_attentions.append(layer_output[2])

        encoded = encode(merger_of(self), self.layer, hidden_states, output_attentions, each=collect)
        hidden_states = encoded.hidden_states
        hidden = (*all_hidden_states, hidden_states) if output_hidden_states else None
        attentions = tuple(all_attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (hidden_states, hidden, attentions) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=hidden, attentions=attentions)


@register_outputs
class TimesformerModel(hf.TimesformerModel):
    """Stock forward with input checks."""

    keeps_user_forward = True  # a user's subclass may override forward: it runs the patched encoder

    def forward(self, pixel_values: Tensor, *args: object, **kwargs: object) -> tuple | BaseModelOutput:
        merger = merger_of(self)
        if merger is not None:  # else built from this class by from_pretrained, not patched: stock
            check_input(merger, self.config, pixel_values, FAMILY)
        return super().forward(pixel_values, *args, **kwargs)


def _layout(model: nn.Module) -> Layout:
    config = model.config
    if config.attention_type != "divided_space_time":
        raise TypeError(
            f"vtome supports TimeSformer with attention_type='divided_space_time'; "
            f"this model uses {config.attention_type!r}"
        )
    return Layout(protected=1, frames=config.num_frames, time_minor=True)


def _positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions: class token first, then slot-major, frame-minor."""
    c = model.config
    grid = grid_positions(c.num_frames, c.image_size // c.patch_size, 1, time_major=False)
    return with_class_token(grid), 1, c.patch_size


ADAPTER = Adapter(
    family=FAMILY,
    models=(hf.TimesformerModel, hf.TimesformerForVideoClassification),
    base_attr="timesformer",
    layers_attr="encoder.layer",
    attention="divided",
    prop_attn=True,
    swaps=(
        ("base", TimesformerModel),
        ("base.encoder", TimesformerEncoder),
        ("layer", TimesformerLayer),
        ("layer.attention.attention", TimesformerSelfAttention),
        ("layer.temporal_attention.attention", TimesformerSelfAttention),
    ),
    layout=_layout,
    token_positions=_positions,
)

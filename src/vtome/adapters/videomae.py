"""VideoMAE (Tong et al. 2022): joint space-time attention, spatio-temporal merging over the whole clip.

No class token; the classifier mean-pools, and once tokens are merged that mean must be weighted by
token size (the original merging code takes a plain mean, which over-weights merged regions): the
patched encoder returns the sizes with the tokens, and the patched classifier pools with them.
Proportional attention is off by default, as in the paper's VideoMAE configurations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.videomae import modeling_videomae as hf
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from vtome.adapters import check_input, grid_positions, keeps_output_capture, swap_class
from vtome.layout import Layout
from vtome.merger import Merger, Track, encode, pool_mean

FAMILY = "VideoMAE"
ATTENTION = "joint"
DEFAULT_PROP_ATTN = False


@dataclass
class MergedOutput(BaseModelOutput):
    """``BaseModelOutput`` plus ``token_size`` ``[B, N, 1]``: input patches each output token stands for
    (None when nothing was merged)."""

    token_size: Tensor | None = None


class VideoMAESelfAttention(hf.VideoMAESelfAttention):
    """Stock attention with an optional additive ``bias`` ``[B, 1, 1, N]`` on the logits; also returns the
    projected keys ``[B, N, H*d]`` (the merging metric)."""

    def forward(self, hidden_states: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        projected_keys = self.key(hidden_states)
        keys = projected_keys.view(hidden_shape).transpose(1, 2)
        values = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        queries = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward)
        context, probs = attention(
            self,
            queries,
            keys,
            values,
            bias,
            is_causal=False,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob,
        )
        return context.reshape(*context.shape[:-2], self.all_head_size), probs, projected_keys


class VideoMAELayer(hf.VideoMAELayer):
    """Stock pre-LN block taking and returning ``(hidden_states, track)``, merging between the attention
    residual and the MLP."""

    def forward(self, hidden_states: Tensor, track: Track, **kwargs: object) -> tuple[Tensor, Track]:
        merger: Merger = self._vtome
        i = self._vtome_layer
        normed = self.layernorm_before(hidden_states)
        context, _, keys = self.attention.attention(normed, merger.bias(track, hidden_states.dtype))
        hidden_states = self.attention.output(context, normed) + hidden_states
        hidden_states, track = merger.merge(i, hidden_states, track, keys)
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return layer_output, track


class VideoMAEEncoder(hf.VideoMAEEncoder):
    """The layer loop, carrying the track; returns the sizes in a :class:`MergedOutput`."""

    def forward(self, hidden_states: Tensor, **kwargs: object) -> MergedOutput:
        encoded = encode(self._vtome, self.layer, hidden_states, **kwargs)
        return MergedOutput(last_hidden_state=encoded.hidden_states, token_size=encoded.track.size)


@keeps_output_capture
class VideoMAEModel(hf.VideoMAEModel):
    """Stock forward with input checks; the output also carries ``token_size``."""

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None, **kwargs: object) -> MergedOutput:
        if "_vtome" in self.__dict__:  # else built from this class by from_pretrained, not patched: stock
            check_input(self._vtome, self.config, pixel_values, FAMILY)
        encoded = self.encoder(self.embeddings(pixel_values, bool_masked_pos))
        tokens = encoded.last_hidden_state
        if self.layernorm is not None:
            tokens = self.layernorm(tokens)
        return MergedOutput(last_hidden_state=tokens, token_size=getattr(encoded, "token_size", None))


class VideoMAEForVideoClassification(hf.VideoMAEForVideoClassification):
    """Stock classifier whose mean pooling is weighted by token size once tokens are merged."""

    @can_return_tuple
    def forward(
        self, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kwargs: object
    ) -> ImageClassifierOutput:
        outputs = self.videomae(pixel_values, **kwargs)
        tokens = outputs.last_hidden_state
        if self.fc_norm is not None:
            pooled = self.fc_norm(pool_mean(tokens, getattr(outputs, "token_size", None)))
        else:
            pooled = tokens[:, 0]
        logits = self.classifier(pooled)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def base(model: nn.Module) -> nn.Module:
    return getattr(model, "videomae", model)


def layers(model: nn.Module) -> nn.ModuleList:
    return base(model).encoder.layer


def layout(model: nn.Module) -> Layout:
    # Without mean pooling the classifier reads token 0, so that token is protected.
    reads_first = getattr(model, "fc_norm", None) is None and hasattr(model, "classifier")
    return Layout(protected=1 if reads_first else 0)


def apply(model: nn.Module, merger: Merger) -> None:
    if isinstance(model, hf.VideoMAEForVideoClassification):
        swap_class(model, VideoMAEForVideoClassification, merger)
    swap_class(base(model), VideoMAEModel, merger)
    swap_class(base(model).encoder, VideoMAEEncoder, merger)
    for i, layer in enumerate(layers(model)):
        swap_class(layer, VideoMAELayer, merger, i)
        swap_class(layer.attention.attention, VideoMAESelfAttention, merger, i)


def token_positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Where each input token sits: ``[N0, 3]`` rows ``(first frame, patch row, patch column)`` (-1 for a
    class token), the frames each token spans (tubelet) and the patch size in pixels."""
    c = model.config
    return (
        grid_positions(c.num_frames // c.tubelet_size, c.image_size // c.patch_size, c.tubelet_size, time_major=True),
        c.tubelet_size,
        c.patch_size,
    )

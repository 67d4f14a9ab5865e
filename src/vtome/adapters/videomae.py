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

from vtome.adapters import Adapter, attend, block, check_input, grid_positions, merger_of, register_outputs
from vtome.layout import Layout
from vtome.merger import Track, encode, pool_mean

FAMILY = "VideoMAE"


@dataclass
class MergedOutput(BaseModelOutput):
    """``BaseModelOutput`` plus ``token_size`` ``[B, N, 1]``: input patches each output token stands for
    (None when nothing was merged)."""

    token_size: Tensor | None = None


# Copied from transformers.models.videomae.modeling_videomae.VideoMAESelfAttention.forward (5.x), with a bias and
# the keys returned
class VideoMAESelfAttention(hf.VideoMAESelfAttention):
    """Stock attention with an optional additive ``bias`` ``[B, 1, 1, N]`` on the logits; also returns the
    projected keys ``[B, N, H*d]`` (the merging metric)."""

    def forward(self, hidden_states: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        return attend(
            self,
            hidden_states,
            (self.query, self.key, self.value),
            self.attention_head_size,
            bias,
            ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, hf.eager_attention_forward),
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob,
        )


# Copied from transformers.models.videomae.modeling_videomae.VideoMAELayer.forward (5.x), with the merge step
class VideoMAELayer(hf.VideoMAELayer):
    """Stock pre-LN block taking and returning ``(hidden_states, track)``, merging between the attention
    residual and the MLP."""

    def forward(self, hidden_states: Tensor, track: Track, **kwargs: object) -> tuple[Tensor, Track]:
        def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
            normed = self.layernorm_before(x)
            context, probs, keys = self.attention.attention(normed, bias)
            return self.attention.output(context, normed), probs, keys

        def mlp(x: Tensor) -> Tensor:
            return self.output(self.intermediate(self.layernorm_after(x)), x)

        hidden_states, track, _ = block(self, hidden_states, track, attention, mlp)
        return hidden_states, track


class VideoMAEEncoder(hf.VideoMAEEncoder):
    """The layer loop, carrying the track; returns the sizes in a :class:`MergedOutput`."""

    def forward(self, hidden_states: Tensor, **kwargs: object) -> MergedOutput:
        encoded = encode(merger_of(self), self.layer, hidden_states, **kwargs)
        return MergedOutput(last_hidden_state=encoded.hidden_states, token_size=encoded.track.size)


@register_outputs
class VideoMAEModel(hf.VideoMAEModel):
    """Stock forward with input checks; the output also carries ``token_size``."""

    keeps_user_forward = True  # a user's subclass may override forward: it runs the patched encoder

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None, **kwargs: object) -> MergedOutput:
        merger = merger_of(self)
        if merger is not None:  # else built from this class by from_pretrained, not patched: stock
            check_input(merger, self.config, pixel_values, FAMILY)
        encoded = self.encoder(self.embeddings(pixel_values, bool_masked_pos))
        tokens = encoded.last_hidden_state
        if self.layernorm is not None:
            tokens = self.layernorm(tokens)
        return MergedOutput(last_hidden_state=tokens, token_size=getattr(encoded, "token_size", None))


class VideoMAEForVideoClassification(hf.VideoMAEForVideoClassification):
    """Stock classifier whose mean pooling is weighted by token size once tokens are merged."""

    keeps_user_forward = True  # a user's subclass may override forward (its pooling is then its own)

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


def _layout(model: nn.Module) -> Layout:
    # Without mean pooling the classifier reads token 0, so that token is protected.
    reads_first = getattr(model, "fc_norm", None) is None and hasattr(model, "classifier")
    return Layout(protected=1 if reads_first else 0)


def _positions(model: nn.Module) -> tuple[Tensor, int, int]:
    c = model.config
    grid = grid_positions(c.num_frames // c.tubelet_size, c.image_size // c.patch_size, c.tubelet_size, True)
    return grid, c.tubelet_size, c.patch_size


ADAPTER = Adapter(
    family=FAMILY,
    models=(hf.VideoMAEModel, hf.VideoMAEForVideoClassification),
    base_attr="videomae",
    layers_attr="encoder.layer",
    attention="joint",
    prop_attn=False,  # as in the paper's VideoMAE configurations
    swaps=(
        ("model", VideoMAEForVideoClassification),
        ("base", VideoMAEModel),
        ("base.encoder", VideoMAEEncoder),
        ("layer", VideoMAELayer),
        ("layer.attention.attention", VideoMAESelfAttention),
    ),
    layout=_layout,
    token_positions=_positions,
)

"""V-JEPA 2 (Assran et al. 2025): joint space-time attention with 3-D rotary positions, attentive pooler.

What differs from the other joint space-time families, and what the patched classes do about it:

- **Positions.** Every encoder attention rotates queries and keys by each token's (frame, row, column),
  which the stock layer derives from the token's index in the sequence (``arange(N)`` when no
  ``position_mask`` is given, which the encoder never gives). After a merge the indices no longer name
  positions, so the patched encoder carries positions as values: ``Track.positions`` ``[B, N, 3]``
  (float32; temporal index, row, column, as the stock layer derives them from the token ids) starts at
  the grid and is merged with the tokens (:class:`vtome.settings.MergeSettings` ``position_merge``: ``mean``,
  the size-weighted mean of the patches a token covers (RoPE is defined for fractional positions), or
  ``destination``, the surviving token's own position). Surviving tokens keep their positions exactly.
  The rotation itself is the stock one, given positions instead of ids.
- **Matching metric.** The keys before rotation (their content), averaged over heads.
- **No class token.** Every token can merge (``Layout(protected=0)``).
- **Attentive pooler.** The classifier pools with self-attention layers over the encoder tokens, then one
  query cross-attending to them. Once tokens are merged, both add ``log(size)`` to the logits of every key,
  so a merged token counts once per patch it covers: with exact duplicates this equals the unmerged
  pooler. This is applied whenever tokens are merged (it is the pooling's correctness, as VideoMAE's
  size-weighted mean), independently of ``prop_attn`` (proportional attention inside the encoder).
- **Predictor.** ``VJEPA2Model`` runs its predictor unless ``skip_predictor=True``. It needs the encoder
  output at every position, so it gets the merged output unmerged back to the input grid (each position
  takes the token covering it); ``last_hidden_state`` stays merged (``vtome.unmerge`` maps it back).
  In ``drop`` modes the dropped positions are not given to the predictor as context (it predicts them, as
  for V-JEPA's masked context); ``hybrid`` drops a data-dependent number of positions and asks for
  ``skip_predictor=True`` (``masked_hidden_state`` is then None) or a ``context_mask`` of kept positions.

The eager attention of the stock model ignores attention masks, so the patched attentions (encoder and
pooler) use an eager function that adds them; without a mask it is the stock function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vjepa2 import modeling_vjepa2 as hf
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from vtome.adapters import (
    Adapter,
    attend,
    block,
    check_attention_backend,
    grid_positions,
    merger_of,
    register_outputs,
)
from vtome.layout import Layout
from vtome.merge import attention_bias, unmerge_tokens
from vtome.merger import Merger, Track, encode

FAMILY = "V-JEPA 2"
DROPPING_MODES = ("drop", "random_drop", "hybrid")


def eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[Tensor, Tensor]:
    """Eager attention ``[B, H, Nq, d]`` x ``[B, H, N, d]`` -> ``([B, Nq, H, d], probs [B, H, Nq, N])`` that adds
    ``attention_mask`` (``[B, 1, 1, N]``) to the logits; the stock function when there is no mask."""
    if attention_mask is None:
        return hf.eager_attention_forward(module, query, key, value, None, scaling, dropout, **kwargs)
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling + attention_mask
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _attention_function(config: object) -> object:
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention)


def grid_ids(attention: hf.VJEPA2RopeAttention, tokens: Tensor) -> Tensor:
    """``[N, 3]`` float32 (temporal index, row, column) of tokens ``[B, N, C]`` in stock order, as the stock
    attention derives them from the token ids ``arange(N)``."""
    return torch.stack(attention.get_position_ids(tokens), dim=-1).float()


def rope_axes(positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Positions ``[B, N, 3]`` -> the three per-axis position tensors ``[B, 1, N]`` the stock rotation takes."""
    axes = positions.to(dtype).unsqueeze(1)
    return axes[..., 0], axes[..., 1], axes[..., 2]


@dataclass
class MergedEncoderOutput(BaseModelOutput):
    """``BaseModelOutput`` plus ``token_size`` ``[B, N, 1]`` and ``token_index`` ``[B, N0]`` (see
    :class:`vtome.merger.Track`; None when nothing was merged)."""

    token_size: Tensor | None = None
    token_index: Tensor | None = None


@dataclass
class MergedModelOutput(hf.VJEPA2WithMaskedInputModelOutput):
    """The stock V-JEPA 2 output plus ``token_size`` ``[B, N, 1]``: input patches each token of
    ``last_hidden_state`` stands for (None when nothing was merged)."""

    token_size: Tensor | None = None

    def to_tuple(self) -> tuple:
        values = (self[k] for k in self.keys())
        return tuple(v.to_tuple() if isinstance(v, hf.VJEPA2WithMaskedInputPredictorOutput) else v for v in values)


# Copied from transformers.models.vjepa2.modeling_vjepa2.VJEPA2RopeAttention.forward (5.x), with positions as
# values, a bias and the keys returned
class VJEPA2RopeAttention(hf.VJEPA2RopeAttention):
    """Stock rotary attention that takes positions ``[B, N, 3]`` instead of ids (None: the stock ids) and an
    additive ``bias`` ``[B, 1, 1, N]``; also returns the projected keys before rotation ``[B, N, H*d]``."""

    def forward(
        self,
        hidden_states: Tensor,
        position_mask: Tensor | None = None,
        positions: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        if positions is None:
            pos = self.get_position_ids(hidden_states, masks=position_mask)
        else:
            pos = rope_axes(positions, hidden_states.dtype)
        context, probs, keys = attend(
            self,
            hidden_states,
            (self.query, self.key, self.value),
            self.attention_head_size,
            bias,
            _attention_function(self.config),
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob,
            rotate=lambda t: self.apply_rotary_embeddings(t, pos),
        )
        return self.proj(context), probs, keys


# Copied from transformers.models.vjepa2.modeling_vjepa2.VJEPA2Layer.forward (5.x), with positions and the merge step
class VJEPA2Layer(hf.VJEPA2Layer):
    """Stock pre-LN block taking and returning ``(hidden_states, track)`` (then the attention probabilities),
    rotating by the track's positions and merging between the attention residual and the MLP."""

    def forward(self, hidden_states: Tensor, track: Track, **kwargs: object) -> tuple[Tensor, Track, Tensor | None]:
        def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
            context, probs, keys = self.attention(self.norm1(x), None, track.positions, bias)
            return self.drop_path(context), probs, keys

        def mlp(x: Tensor) -> Tensor:
            return self.drop_path(self.mlp(self.norm2(x))) + x

        return block(self, hidden_states, track, attention, mlp)


class VJEPA2Encoder(hf.VJEPA2Encoder):
    """Embeddings, the layer loop carrying the track (positions from the token grid when any layer merges),
    final norm; returns sizes and the index map with the tokens."""

    def forward(self, pixel_values_videos: Tensor | None = None, **kwargs: object) -> MergedEncoderOutput:
        merger: Merger = merger_of(self)
        hidden_states = self.embeddings(pixel_values_videos)
        positions = None
        if merger.settings.plan.merges:  # else the stock ids: bit-exact at r = 0
            positions = grid_ids(self.layer[0].attention, hidden_states).expand(hidden_states.shape[0], -1, -1)
        encoded = encode(merger, self.layer, hidden_states, positions=positions, **kwargs)
        index = merger.layout.global_index(encoded.track.index, encoded.hidden_states.shape[1])
        return MergedEncoderOutput(
            last_hidden_state=self.layernorm(encoded.hidden_states),
            token_size=encoded.track.size,
            token_index=index,
        )


def _check_clip(config: object, pixel_values_videos: Tensor | None) -> None:
    if pixel_values_videos is None:
        raise ValueError("You have to specify pixel_values_videos")
    shape, channels = tuple(pixel_values_videos.shape), config.in_chans
    if pixel_values_videos.dim() != 5:
        raise ValueError(f"{FAMILY} expects pixel_values_videos [batch, frames, channels, height, width]; got {shape}")
    if shape[2] != channels:
        hint = ", which looks like [B, C, T, H, W]: pass .transpose(1, 2)" if shape[1] == channels else ""
        raise ValueError(f"{FAMILY} expects {channels} channels at dim 2 of [B, T, C, H, W]; got {shape}{hint}")


def _context(
    merger: Merger, index: Tensor, tokens: int, context_mask: list[Tensor] | None, needed: bool
) -> list[Tensor] | None:
    """The predictor's context positions on a merged encoder: every position in merge modes; the kept ones
    (``[B, tokens]``, ascending) in drop modes; none in hybrid mode (an error if the predictor runs, ``needed``);
    a caller's ``context_mask`` must name covered positions."""
    mode = merger.settings.mode
    if context_mask is None:
        if mode not in DROPPING_MODES:
            return [torch.arange(index.shape[1], device=index.device).expand(index.shape[0], -1)]
        if mode == "hybrid":
            if not needed:
                return None
            raise ValueError(
                "vtome: hybrid mode drops a data-dependent number of positions, so the V-JEPA 2 predictor has no "
                "default context on a merged encoder; pass skip_predictor=True, a context_mask of kept positions "
                "(vtome.last_run(model).index >= 0), or use mode='merge'"
            )
        # drop modes: each output token covers exactly one position; those positions, in ascending order
        kept = torch.argsort((index < 0).to(torch.int8), dim=1, stable=True)[:, :tokens]
        return [kept]
    if mode in DROPPING_MODES and not torch.compiler.is_compiling():
        for mask in context_mask:
            if bool((index.gather(1, mask.to(index.device)) < 0).any()):
                raise ValueError(
                    "vtome: context_mask names positions this merged encoder dropped; give the predictor only kept "
                    "positions (vtome.last_run(model).index >= 0)"
                )
    return context_mask


# Copied from transformers.models.vjepa2.modeling_vjepa2.VJEPA2Model.forward (5.x), on the merged encoder
@register_outputs
class VJEPA2Model(hf.VJEPA2Model):
    """Stock forward on the merged encoder: ``last_hidden_state`` is merged (with ``token_size``); the
    predictor and ``masked_hidden_state``/``target_hidden_state`` read the output unmerged to the input grid."""

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values_videos: Tensor,
        context_mask: list[Tensor] | None = None,
        target_mask: list[Tensor] | None = None,
        skip_predictor: bool = False,
        **kwargs: object,
    ) -> MergedModelOutput:
        merger = merger_of(self)  # None: built by from_pretrained, not patched
        _check_clip(self.config, pixel_values_videos)
        if merger is not None and merger.settings.prop_attn:
            check_attention_backend(self.config)
        encoded = self.encoder(pixel_values_videos=pixel_values_videos, **kwargs)
        tokens = encoded.last_hidden_state
        index = getattr(encoded, "token_index", None)
        grid = tokens if index is None else unmerge_tokens(tokens, index)  # [B, N0, C]
        batch, n0 = grid.shape[:2]
        if index is not None and merger is not None:
            context_mask = _context(merger, index, tokens.shape[1], context_mask, not skip_predictor)
            if context_mask is None:  # hybrid, predictor skipped: no context to report
                return MergedModelOutput(last_hidden_state=tokens, token_size=getattr(encoded, "token_size", None))
        everything = [torch.arange(n0, device=grid.device).unsqueeze(0).repeat((batch, 1))]
        if context_mask is None and target_mask is None:
            context_mask = target_mask = everything
        elif target_mask is None and index is not None:  # merged: the default drop-mode context, or the caller's
            target_mask = everything
        predictor_output = None
        if not skip_predictor:
            predicted = self.predictor(
                encoder_hidden_states=grid, context_mask=context_mask, target_mask=target_mask, **kwargs
            )
            predictor_output = hf.VJEPA2WithMaskedInputPredictorOutput(
                last_hidden_state=predicted.last_hidden_state,
                target_hidden_state=hf.apply_masks(grid, target_mask),
                hidden_states=predicted.hidden_states,
                attentions=predicted.attentions,
            )
        return MergedModelOutput(
            last_hidden_state=tokens,
            masked_hidden_state=hf.apply_masks(grid, context_mask),
            predictor_output=predictor_output,
            token_size=getattr(encoded, "token_size", None),
        )


class VJEPA2PoolerSelfAttention(hf.VJEPA2PoolerSelfAttention):
    """Stock pooler self-attention whose eager path adds the attention mask (the stock eager one ignores it)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        context, probs, _ = attend(
            self,
            hidden_states,
            (self.q_proj, self.k_proj, self.v_proj),
            self.head_dim,
            attention_mask,
            _attention_function(self.config),
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
        )
        return self.out_proj(context.contiguous()), probs


class VJEPA2PoolerCrossAttention(hf.VJEPA2PoolerCrossAttention):
    """Stock pooler cross-attention whose eager path adds the attention mask."""

    def forward(
        self, queries: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        batch, n_q, dim = queries.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(queries).view(batch, n_q, heads, head_dim).transpose(1, 2)
        k = self.k_proj(keys).view(batch, keys.shape[1], heads, head_dim).transpose(1, 2)
        v = self.v_proj(values).view(batch, values.shape[1], heads, head_dim).transpose(1, 2)
        output, probs = _attention_function(self.config)(
            self,
            q,
            k,
            v,
            attention_mask,
            is_causal=False,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
        )
        return output.reshape(batch, n_q, dim).contiguous(), probs


class VJEPA2AttentivePooler(hf.VJEPA2AttentivePooler):
    """Stock attentive pooler ``[B, N, C]`` -> ``[B, C]`` whose self- and cross-attention weigh each token by
    its ``size`` ``[B, N, 1]`` (``log(size)`` on its logits; None: the stock pooler)."""

    def forward(self, hidden_state: Tensor, size: Tensor | None = None) -> Tensor:
        bias = None if size is None else attention_bias(size, hidden_state.dtype)
        for layer in self.self_attention_layers:
            hidden_state = layer(hidden_state, attention_mask=bias)[0]
        queries = self.query_tokens.repeat(hidden_state.shape[0], 1, 1)
        return self.cross_attention_layer(queries, hidden_state, attention_mask=bias)[0].squeeze(1)


class VJEPA2ForVideoClassification(hf.VJEPA2ForVideoClassification):
    """Stock classifier whose attentive pooler weighs merged tokens by size."""

    keeps_user_forward = True  # a user's subclass may override forward (its pooling is then its own)

    @can_return_tuple
    def forward(
        self, pixel_values_videos: Tensor, labels: Tensor | None = None, **kwargs: object
    ) -> ImageClassifierOutput:
        outputs = self.vjepa2(pixel_values_videos=pixel_values_videos, skip_predictor=True, **kwargs)
        size = getattr(outputs, "token_size", None)
        if size is not None:
            check_attention_backend(self.config)  # the pooler's size weighting is an additive mask
            pooled = self.pooler(outputs.last_hidden_state, size)
        else:
            pooled = self.pooler(outputs.last_hidden_state)
        logits = self.classifier(pooled)
        loss = None if labels is None else self.loss_function(pooled_logits=logits, labels=labels, config=self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def _pooler_layers(model: nn.Module) -> int | None:
    """The FLOP model's attentive pooler: the classifier's self-attention layers (None for the base model)."""
    return model.config.num_pooler_layers if isinstance(model, hf.VJEPA2ForVideoClassification) else None


def _positions(model: nn.Module) -> tuple[Tensor, int, int]:
    """Input token positions for the config's clip (``frames_per_clip`` x ``crop_size``)."""
    c = model.config
    grid = grid_positions(c.frames_per_clip // c.tubelet_size, c.crop_size // c.patch_size, c.tubelet_size, True)
    return grid, c.tubelet_size, c.patch_size


ADAPTER = Adapter(
    family=FAMILY,
    models=(hf.VJEPA2Model, hf.VJEPA2ForVideoClassification),
    base_attr="vjepa2",
    layers_attr="encoder.layer",
    attention="joint",
    prop_attn=True,
    swaps=(
        ("model", VJEPA2ForVideoClassification),
        ("model.pooler", VJEPA2AttentivePooler),
        ("model.pooler.cross_attention_layer.cross_attn", VJEPA2PoolerCrossAttention),
        ("base", VJEPA2Model),
        ("base.encoder", VJEPA2Encoder),
        ("layer", VJEPA2Layer),
        ("layer.attention", VJEPA2RopeAttention),
        ("model.pooler.self_attention_layers.*.self_attn", VJEPA2PoolerSelfAttention),
    ),
    layout=lambda model: Layout(protected=0),
    token_positions=_positions,
    pooler_of=_pooler_layers,
    positions=True,
)

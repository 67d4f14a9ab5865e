"""Token matching and merging: pure tensor code, no model imports.

Bipartite soft matching (Bolya et al., ToMe 2023) as extended to video by Pollard & Wray (2025):
tokens are split alternately into sets A (even positions) and B (odd positions); each A token finds its
most similar B token (cosine similarity of a metric, usually the attention keys); the ``r`` A tokens
with the best match leave A. What happens to them depends on the reduction mode:

- ``merge``: each leaving A token is averaged into its B partner, weighted by token size;
- ``drop``: the leaving A tokens are discarded;
- ``random_merge`` / ``random_drop``: as above, but the scores and partners are random;
- ``hybrid``: a pair whose similarity is at least ``threshold`` merges; below it the B partner is
  dropped and the A token takes its place (when several A tokens reach one replaced B token they are
  averaged there, the B token's own content and size discarded).

Everything works on a batch of token groups ``[G, N, D]``: the adapters decide what a group is (a
whole clip for joint space-time attention, one frame for divided space-time attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MODES: tuple[str, ...] = ("merge", "drop", "random_merge", "random_drop", "hybrid")
HEAD_AGGREGATIONS: tuple[str, ...] = ("mean", "concat")

Merge = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def aggregate_heads(keys: Tensor, num_heads: int, how: str = "mean") -> Tensor:
    """Turn projected keys ``[G, N, H*d]`` into a matching metric: ``[G, N, d]`` (mean) or ``[G, N, H*d]``."""
    if how == "concat":
        return keys
    g, n, c = keys.shape
    return keys.view(g, n, num_heads, c // num_heads).mean(2)


def max_merge(num_tokens: int) -> int:
    """Largest ``r`` one bipartite step can remove from ``num_tokens`` tokens (half of them)."""
    return num_tokens // 2


def bipartite_match(
    metric: Tensor,
    r: int,
    *,
    mode: str = "merge",
    threshold: float = 0.0,
    generator: torch.Generator | None = None,
) -> Merge:
    """Match ``r`` tokens of ``metric`` ``[G, N, C]`` away and return the function that applies it.

    The returned ``merge(x)`` maps any ``[G, N, D]`` tensor to ``[G, N - r, D]``: the A tokens that stay
    (in their original order) followed by the B tokens. In the merging modes a B token receives the
    **sum** of the A tokens merged into it, so callers average by merging ``x * size`` and ``size``
    (see :func:`merge_tokens`). ``r`` must already be capped at ``max_merge(N)``.
    """
    g, n, _ = metric.shape
    if r <= 0:
        return _identity
    if r > max_merge(n):
        raise ValueError(f"r={r} exceeds half of the {n} tokens; cap it with max_merge()")
    n_a, n_b = (n + 1) // 2, n // 2
    device = metric.device
    with torch.no_grad():
        if mode.startswith("random"):
            scores = torch.rand(g, n_a, device=device, generator=generator)
            partner = torch.randint(n_b, (g, n_a), device=device, generator=generator)
        else:
            unit = F.normalize(metric, dim=-1)
            scores, partner = (unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).max(dim=-1)
        order = scores.argsort(dim=-1, descending=True, stable=True)
        src_idx = order[:, :r]
        unm_idx = order[:, r:].sort(dim=-1).values
        dst_idx = partner.gather(1, src_idx)
        keep_b = None
        if mode == "hybrid":
            similar = (scores.gather(1, src_idx) >= threshold).to(metric.dtype)
            keep_b = metric.new_ones(g, n_b).scatter_reduce(1, dst_idx, similar, reduce="amin")
    drops = mode in ("drop", "random_drop")

    def merge(x: Tensor) -> Tensor:
        d = x.shape[-1]
        a, b = x[:, ::2], x[:, 1::2]
        kept = a.gather(1, unm_idx.unsqueeze(-1).expand(g, n_a - r, d))
        if drops:
            return torch.cat([kept, b], dim=1)
        src = a.gather(1, src_idx.unsqueeze(-1).expand(g, r, d))
        if keep_b is not None:
            b = b * keep_b.unsqueeze(-1).to(b.dtype)
        b = b.scatter_add(1, dst_idx.unsqueeze(-1).expand(g, r, d), src)
        return torch.cat([kept, b], dim=1)

    merge.averages = not drops  # type: ignore[attr-defined]
    return merge


def merge_tokens(
    merge: Merge, x: Tensor, size: Tensor, source: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Apply ``merge`` to features ``x`` ``[G, N, C]``, sizes ``[G, N, 1]`` and, if given, source ``[G, N, N0]``.

    Merged features are size-weighted averages (computed in the sizes' dtype, float32, and cast back);
    sizes and source maps are summed, so a merge conserves both.
    """
    if merge is _identity:
        return x, size, source
    if getattr(merge, "averages", True):
        new_size = merge(size)
        x = (merge(x * size) / new_size).to(x.dtype)
        size = new_size
    else:
        x, size = merge(x), merge(size)
    if source is not None:
        source = merge(source)
    return x, size, source


def attention_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention: ``log(size)`` for keys, ``[G, N]`` or ``[G, N, 1]`` -> additive mask ``[G, 1, 1, N]``."""
    if size.dim() == 3:
        size = size.squeeze(-1)
    return size.log().to(dtype)[:, None, None, :]


def parse_schedule(r: int | tuple[int, float] | list[int], num_layers: int, start_layer: int = 0) -> list[int]:
    """Resolve an ``r`` setting to one value per layer.

    ``int``: the same every layer. ``(r, inflection)``: a linear schedule from ``r * (1 - inflection)`` in
    the first layer to ``r * (1 + inflection)`` in the last, averaging ``r`` (inflection -1: decreasing,
    0: constant, 1: increasing). ``list``: one value per layer. Layers before ``start_layer`` get 0.
    """
    if isinstance(r, tuple):
        base, inflection = r
        first, last = base * (1.0 - inflection), base * (1.0 + inflection)
        step = (last - first) / max(num_layers - 1, 1)
        values = [int(round(first + step * i)) for i in range(num_layers)]
    elif isinstance(r, list):
        values = list(r)
    else:
        values = [r] * num_layers
    return [0 if i < start_layer else v for i, v in enumerate(values)]

"""Token matching and merging: pure tensor code, no model imports.

Bipartite soft matching (Bolya et al., ToMe 2023) as extended to video by Pollard & Wray (2025). One step
takes a group of ``N`` tokens ``[G, N, D]`` (the adapters decide what a group is: a whole clip for joint
space-time attention, one frame for divided space-time attention), of which the first ``p`` are protected
(a class token: never removed, never a destination), and removes ``r <= (N - p) // 2`` of them.

The published rule (``order="paper"``, the default), for each group:

1. Split by position over the *whole* group, protected tokens included: A = even positions
   ``0, 2, 4, ...``, B = odd positions ``1, 3, 5, ...``.
2. Each A token's score is its best cosine similarity to any B token (of the metric, usually the
   attention keys averaged over heads); its partner is that B token (the first one on ties). A protected
   A token scores ``-inf``; a protected B token is never a partner.
3. Sort the A tokens by score, descending, with a stable sort (ties keep position order). The first ``r``
   leave; the rest stay.
4. Output ``[staying A, B]``. The B tokens keep their original order. The staying A tokens keep the
   sorted (descending score) order when the group has no protected token, and their original order when it
   has one (so a class token at position 0 stays first).

What happens to a leaving A token depends on the reduction mode:

- ``merge``: it is averaged into its B partner, weighted by token size (how many input patches each
  token stands for); sizes add up;
- ``drop``: it is discarded;
- ``random_merge`` / ``random_drop``: as above, but scores and partners are drawn at random (the paper's
  controls);
- ``hybrid``: a pair whose similarity is at least ``threshold`` merges; below it the B partner is
  dropped and the A token takes its place (several A tokens reaching one replaced B token are averaged
  there, the B token's own content and size discarded).

``order="spatial"`` is the alternative: the protected tokens are set aside first and stay in front, the
alternation A/B starts after them, and staying A tokens always keep their original order. It picks
different pairs from the published method after the first merge (the next layer splits by position
again), but keeps tokens in a stable spatial order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MODES: tuple[str, ...] = ("merge", "drop", "random_merge", "random_drop", "hybrid")
HEAD_AGGREGATIONS: tuple[str, ...] = ("mean", "concat")
ORDERS: tuple[str, ...] = ("paper", "spatial")


def aggregate_heads(keys: Tensor, num_heads: int, how: str = "mean") -> Tensor:
    """Turn keys into a matching metric: projected ``[G, N, H*d]`` or per head ``[G, H, N, d]`` ->
    ``[G, N, d]`` (``mean`` over heads) or ``[G, N, H*d]`` (``concat``)."""
    if keys.dim() == 4:
        return keys.mean(1) if how == "mean" else keys.transpose(1, 2).flatten(2)
    if how == "concat":
        return keys
    g, n, c = keys.shape
    return keys.reshape(g, n, num_heads, c // num_heads).mean(2)


def max_merge(num_tokens: int) -> int:
    """Largest ``r`` one bipartite step can remove from ``num_tokens`` mergeable tokens (half of them)."""
    return num_tokens // 2


@dataclass(frozen=True)
class Merge:
    """A matching, ready to apply to any tensor laid out like its metric: ``[G, N, D]`` -> ``[G, N - r, D]``.

    Output order: the ``head`` set-aside tokens (``order="spatial"`` only), the A tokens that stay (in the
    order of ``unm_idx``), then the B tokens. A is ``x[:, head::2]``, B is ``x[:, head + 1::2]``.
    ``merge(t)`` sums the A tokens merged into each B token (for sizes and source maps); :meth:`average`
    gives size-weighted features. ``r == 0`` is the identity.
    """

    head: int = 0
    r: int = 0
    unm_idx: Tensor | None = None  # [G, n_a - r] A tokens that stay, in output order
    src_idx: Tensor | None = None  # [G, r] A tokens that leave
    dst_idx: Tensor | None = None  # [G, r] their B partners
    keep_b: Tensor | None = None  # [G, n_b] 0 where hybrid drops the B token, else 1 (None: all kept)
    drops: bool = False  # leaving A tokens are discarded instead of merged

    def _stay(self, x: Tensor) -> Tensor:
        """A new tensor ``[head, staying A, B]``."""
        h, g, d = self.head, x.shape[0], x.shape[-1]
        kept = x[:, h::2].gather(1, self.unm_idx.unsqueeze(-1).expand(g, self.unm_idx.shape[1], d))
        return torch.cat([x[:, :h], kept, x[:, h + 1 :: 2]], dim=1)

    def _leaving(self, x: Tensor) -> Tensor:
        g, d = x.shape[0], x.shape[-1]
        return x[:, self.head :: 2].gather(1, self.src_idx.unsqueeze(-1).expand(g, self.r, d))

    def _b_part(self, out: Tensor) -> Tensor:
        return out[:, self.head + self.unm_idx.shape[1] :]

    def _dst(self, d: int) -> Tensor:
        return self.dst_idx.unsqueeze(-1).expand(-1, -1, d)

    def __call__(self, x: Tensor) -> Tensor:
        if self.r == 0:
            return x
        out = self._stay(x)
        if not self.drops:
            b = self._b_part(out)
            if self.keep_b is not None:
                b.mul_(self.keep_b.unsqueeze(-1).to(b.dtype))
            b.scatter_add_(1, self._dst(x.shape[-1]), self._leaving(x))
        return out

    def average(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        """Size-weighted merge of ``x`` ``[G, N, C]`` with sizes ``[G, N, 1]`` (float32; None: all ones).

        Returns the merged features, where a B token becomes ``sum(x * size) / sum(size)`` over itself and
        the A tokens merged into it (accumulated in at least float32), and the merged sizes.
        """
        if size is None:
            size = torch.ones(*x.shape[:2], 1, device=x.device, dtype=torch.float32)
        if self.r == 0:
            return x, size
        new_size = self(size)
        out = self._stay(x)
        if self.drops:
            return out, new_size
        weight_b = size[:, self.head + 1 :: 2]
        if self.keep_b is not None:
            weight_b = weight_b * self.keep_b.unsqueeze(-1)
        leaving = self._leaving(x) * self._leaving(size)
        b, dst = self._b_part(out), self._dst(x.shape[-1])
        if b.dtype == leaving.dtype:  # in place on the B tokens only
            b.mul_(weight_b).scatter_add_(1, dst, leaving).div_(self._b_part(new_size))
        else:  # low-precision features: accumulate in the sizes' precision
            total = (b.to(leaving.dtype) * weight_b).scatter_add_(1, dst, leaving)
            b.copy_(total / self._b_part(new_size))
        return out, new_size

    def keep(self, x: Tensor) -> Tensor:
        """``x`` ``[G, N, D]`` laid out like the output, each output token taking the value of the token it
        was before the merge (a B token keeps its own, even where A tokens were merged into it)."""
        return x if self.r == 0 else self._stay(x)

    def destination(self, n: int) -> Tensor:
        """``[G, n]`` (long): where each of the ``n`` input tokens of a group went in the output, -1 where it
        was discarded (a dropped A token, or a B token that hybrid replaced)."""
        if self.r == 0:
            raise ValueError("destination() needs a matching that removes tokens (r > 0)")
        g, h, device = self.unm_idx.shape[0], self.head, self.unm_idx.device
        n_unm, n_b = self.unm_idx.shape[1], (n - h) // 2
        dest_a = torch.full((g, (n - h + 1) // 2), -1, dtype=torch.long, device=device)
        dest_a.scatter_(1, self.unm_idx, torch.arange(h, h + n_unm, device=device).expand(g, -1))
        if not self.drops:
            dest_a.scatter_(1, self.src_idx, h + n_unm + self.dst_idx)
        dest_b = torch.arange(h + n_unm, h + n_unm + n_b, device=device).expand(g, -1)
        if self.keep_b is not None:
            dest_b = torch.where(self.keep_b > 0, dest_b, -1)
        dest = torch.empty(g, n, dtype=torch.long, device=device)
        dest[:, :h] = torch.arange(h, device=device)
        dest[:, h::2] = dest_a
        dest[:, h + 1 :: 2] = dest_b
        return dest

    def repeat(self, times: int) -> Merge:
        """The same matching for ``times`` consecutive groups each: ``[G]`` indices -> ``[G * times]``."""
        if self.r == 0 or times == 1:
            return self

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(times, dim=0)

        return Merge(
            self.head, self.r, rep(self.unm_idx), rep(self.src_idx), rep(self.dst_idx), rep(self.keep_b), self.drops
        )


def bipartite_match(
    metric: Tensor,
    r: int,
    *,
    protected: int = 0,
    mode: str = "merge",
    threshold: float = 0.0,
    order: str = "paper",
    generator: torch.Generator | None = None,
) -> Merge:
    """Match ``r`` tokens of ``metric`` ``[G, N, C]`` away and return the :class:`Merge` that applies it.

    The first ``protected`` tokens are never removed nor merged into; ``order`` is ``"paper"`` (the
    published rule, see the module docstring) or ``"spatial"``. ``r`` must already be capped at
    ``max_merge(N - protected)``. Random modes draw from ``generator`` (the global RNG when None).
    """
    g, n, _ = metric.shape
    p = protected
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    head = 0 if order == "paper" else p
    if r <= 0:
        return Merge(head=head)
    if r > max_merge(n - p):
        raise ValueError(f"r={r} exceeds half of the {n - p} mergeable tokens; cap it with max_merge()")
    n_a, n_b = (n - head + 1) // 2, (n - head) // 2
    # Protected tokens inside the alternation (paper order): A positions 0, 2, .. < p and B positions 1, 3, .. < p.
    pa, pb = ((p + 1) // 2, p // 2) if head == 0 else (0, 0)
    device = metric.device
    with torch.no_grad():
        if mode.startswith("random"):
            scores = torch.rand(g, n_a, device=device, generator=generator)
            partner = torch.randint(n_b - pb, (g, n_a), device=device, generator=generator) + pb
        else:
            unit = F.normalize(metric[:, head:], dim=-1)
            sim = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
            if pb:
                sim[:, :, :pb] = -math.inf
            scores, partner = sim.max(dim=-1)
        if pa:
            scores[:, :pa] = -math.inf
        ranked = scores.argsort(dim=-1, descending=True, stable=True)
        src_idx = ranked[:, :r]
        unm_idx = ranked[:, r:]
        if order == "spatial" or p > 0:
            unm_idx = unm_idx.sort(dim=-1).values
        dst_idx = partner.gather(1, src_idx)
        keep_b = None
        if mode == "hybrid":
            similar = (scores.gather(1, src_idx) >= threshold).float()
            keep_b = similar.new_ones(g, n_b).scatter_reduce(1, dst_idx, similar, reduce="amin")
    return Merge(head, r, unm_idx, src_idx, dst_idx, keep_b, drops=mode in ("drop", "random_drop"))


def merge_tokens(
    merge: Merge, x: Tensor, size: Tensor | None, source: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Apply ``merge`` to features ``x`` ``[G, N, C]``, sizes ``[G, N, 1]`` (None: all ones) and, if given,
    source maps ``[G, N, N0]``. Features are size-weighted averages; sizes and sources are summed, so a
    merge conserves both.
    """
    x, size = merge.average(x, size)
    return x, size, None if source is None else merge(source)


def unmerge_tokens(tokens: Tensor, index: Tensor | None) -> Tensor:
    """Tokens ``[B, N, C]`` back on the input grid ``[B, N0, C]``: input position ``i`` gets token ``index[:, i]``
    (``index`` ``[B, N0]``, -1 for a dropped position, which gets zeros; None: nothing was merged)."""
    if index is None:
        return tokens
    out = tokens.gather(1, index.clamp(min=0).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return out.masked_fill((index < 0).unsqueeze(-1), 0)


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

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

This module owns the algorithm and nothing else: it imports only torch and the standard library, knows no
model, and keeps no state. Under ``torch.compile`` it traces to one graph with no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MODES: tuple[str, ...] = ("merge", "drop", "random_merge", "random_drop", "hybrid")
HEAD_AGGREGATIONS: tuple[str, ...] = ("mean", "concat")
ORDERS: tuple[str, ...] = ("paper", "spatial")


def key_metric(keys: Tensor, num_heads: int, how: str = "mean") -> Tensor:
    """The matching metric from attention keys: projected ``[G, N, H*d]`` or per head ``[G, H, N, d]`` ->
    ``[G, N, d]`` (``mean`` over heads) or ``[G, N, H*d]`` (``concat``, heads side by side)."""
    if how not in HEAD_AGGREGATIONS:
        raise ValueError(f"head_aggregation must be one of {', '.join(HEAD_AGGREGATIONS)}; got {how!r}")
    if keys.dim() == 3:
        if how == "concat":
            return keys
        g, n, c = keys.shape
        keys = keys.view(g, n, num_heads, c // num_heads).transpose(1, 2)
    return keys.mean(1) if how == "mean" else keys.transpose(1, 2).flatten(2)


def max_merge(num_tokens: int) -> int:
    """Largest ``r`` one bipartite step can remove from ``num_tokens`` mergeable tokens (half of them)."""
    return num_tokens // 2


@dataclass(frozen=True)
class Merge:
    """A matching, ready to apply to any tensor laid out like its metric: ``[G, N, D]`` -> ``[G, N - r, D]``.

    Output order: the ``head`` set-aside tokens (``order="spatial"`` only), the A tokens that stay (in the
    order of ``unm_idx``), then the B tokens. A is ``x[:, head::2]``, B is ``x[:, head + 1::2]``.

    The matching is stored as ``dest`` ``[G, N]``: the output token each input token goes to, -1 where it is
    discarded. Applying it is one ``index_add_`` over the flattened groups (:attr:`flat`: ``dest`` offset by
    group, discarded tokens sent to one spare row past the end), so its cost does not grow with the number
    of index tensors a step needs. ``merge(t)`` sums the tokens going to each output token (sizes, source
    maps); :meth:`average` gives size-weighted features. ``r == 0`` is the identity.
    """

    head: int = 0
    r: int = 0
    ranked: Tensor | None = None  # [G, n_a] A tokens by descending score: the first r leave
    sort_staying: bool = False  # staying A tokens in position order (else in score order)
    dest: Tensor | None = None  # [G, N] output token of each input token, -1 where it is discarded
    discards: bool = False  # some token is discarded (drop modes, hybrid)

    @property
    def flat(self) -> Tensor:
        """``[G * N]`` rows of ``dest`` in the flattened output; discarded tokens -> ``G * (N - r)`` (a spare
        row). (A model's merge step applies ``dest`` in its own token order instead.)"""
        return group_index(self.dest, self.dest.shape[1] - self.r, self.discards)

    @property
    def unm_idx(self) -> Tensor:
        """``[G, n_a - r]`` the A tokens that stay, in output order."""
        staying = self.ranked[:, self.r :]
        return staying.sort(dim=-1).values if self.sort_staying else staying

    def _sum(self, x: Tensor) -> Tensor:
        """``[G, N, D]`` -> ``[G, N - r, D]``: each output token the sum of its inputs."""
        return sum_tokens(x, self.flat, x.shape[0], x.shape[1] - self.r, self.discards)

    def keep(self, x: Tensor) -> Tensor:
        """``x`` ``[G, N, D]`` laid out like the output, each output token taking the value of the token it
        was before the merge (a B token keeps its own, even where A tokens were merged into it)."""
        if self.r == 0:
            return x
        h, (g, n, d) = self.head, x.shape
        rows = torch.cat(
            [
                torch.arange(h, device=x.device).expand(g, h),
                h + 2 * self.unm_idx,
                torch.arange(h + 1, n, 2, device=x.device).expand(g, -1),
            ],
            dim=1,
        )
        return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, d))

    def __call__(self, x: Tensor) -> Tensor:
        return x if self.r == 0 else self._sum(x)

    def average(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        """Size-weighted merge of ``x`` ``[G, N, C]`` with sizes ``[G, N, 1]`` (float32; None: all ones).

        Returns the merged features, where an output token is ``sum(x * size) / sum(size)`` over the tokens
        going to it (accumulated in at least float32), and the merged sizes.
        """
        if self.r == 0:
            return x, torch.ones(*x.shape[:2], 1, device=x.device, dtype=torch.float32) if size is None else size
        return average_tokens(x, size, self.flat, x.shape[0], x.shape[1] - self.r, self.discards)

    def repeat(self, times: int) -> Merge:
        """The same matching for ``times`` consecutive groups each: ``[G]`` indices -> ``[G * times]``."""
        if self.r == 0 or times == 1:
            return self
        ranked, dest = (t.repeat_interleave(times, dim=0) for t in (self.ranked, self.dest))
        return Merge(self.head, self.r, ranked, self.sort_staying, dest, self.discards)


def group_index(dest: Tensor, out_tokens: int, spare: bool) -> Tensor:
    """Flatten a destination map ``dest`` ``[G, N]`` (output token of each input token in its group, -1 where
    discarded) into row indices ``[G * N]`` into ``G * out_tokens`` output rows; with ``spare``, discarded
    tokens go to the spare row ``G * out_tokens`` (see :func:`sum_tokens`)."""
    g = dest.shape[0]
    flat = dest
    if g > 1:
        flat = dest + torch.arange(0, g * out_tokens, out_tokens, device=dest.device).unsqueeze(1)
    if spare:
        flat = torch.where(dest >= 0, flat, g * out_tokens)
    return flat.reshape(-1)


def sum_tokens(x: Tensor, index: Tensor, groups: int, tokens: int, spare: bool = False) -> Tensor:
    """Sum tokens into their destinations: ``x`` ``[..., D]`` (``M`` tokens in all) -> ``[groups, tokens, D]``,
    token ``i`` (in flattened order) added to output row ``index[i]`` (``index`` ``[M]`` long, e.g. from
    :func:`group_index`); with ``spare``, ``index == groups * tokens`` discards a token. One ``index_add_``."""
    d = x.shape[-1]
    out = x.new_zeros(groups * tokens + spare, d)
    out.index_add_(0, index, x.reshape(-1, d))
    return (out[: groups * tokens] if spare else out).view(groups, tokens, d)


def average_tokens(
    x: Tensor, size: Tensor | None, index: Tensor, groups: int, tokens: int, spare: bool = False
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of ``x`` ``[..., C]`` with sizes ``[..., 1]`` (float32; None: all ones) into
    ``[groups, tokens, C]`` by ``index`` (as in :func:`sum_tokens`).

    Returns the merged features, each output token ``sum(x * size) / sum(size)`` over the tokens going
    to it (accumulated in at least float32, returned in ``x``'s dtype), and the merged sizes ``[groups, tokens, 1]``.
    """
    if size is None:
        size = torch.ones(*x.shape[:-1], 1, device=x.device, dtype=torch.float32)
        weighted = x if x.dtype in (torch.float32, torch.float64) else x.float()
    else:
        weighted = x * size  # promoted to at least the sizes' float32
    new_size = sum_tokens(size, index, groups, tokens, spare)
    out = sum_tokens(weighted, index, groups, tokens, spare)
    out = out / new_size.to(out.dtype)
    return (out if out.dtype == x.dtype else out.to(x.dtype)), new_size


def _destinations(
    head: int, r: int, n: int, ranked: Tensor, sort_staying: bool, partner: Tensor | None, keep_b: Tensor | None
) -> Tensor:
    """``dest`` ``[G, n]`` of a matching: the ``head`` set-aside tokens, then A and B alternating. Leaving A
    tokens go to their ``partner`` (None: they are discarded)."""
    g, n_a = ranked.shape
    n_unm, device = n_a - r, ranked.device
    rank = ranked.argsort(dim=-1)  # each A token's place in the ranking (the inverse permutation)
    staying = rank >= r
    slot = staying.cumsum(dim=-1) + (head - 1) if sort_staying else rank + (head - r)
    leaving_to = -1 if partner is None else partner + (head + n_unm)
    dest_a = torch.where(staying, slot, leaving_to)
    # B in place, padded to n_a entries (one too many when n - head is odd: cut below)
    dest_b = torch.arange(head + n_unm, head + n_unm + n_a, device=device).expand(g, -1)
    if keep_b is not None:
        dest_b = torch.where(keep_b, dest_b, -1)
    dest = torch.stack((dest_a, dest_b), dim=2).view(g, 2 * n_a)
    if 2 * n_a != n - head:
        dest = dest[:, : n - head]
    if head:
        dest = torch.cat((torch.arange(head, device=device).expand(g, head), dest), dim=1)
    return dest


def rule(protected: int, mode: str, order: str) -> tuple[int, bool, bool, bool]:
    """The shape of a matching: (``head`` tokens set aside in front, staying A tokens kept in position order,
    leaving A tokens discarded, hybrid), from the settings (see the module docstring)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    return (
        0 if order == "paper" else protected,
        order == "spatial" or protected > 0,
        mode in ("drop", "random_drop"),
        mode == "hybrid",
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
    key: int | None = None,
) -> Merge:
    """Match ``r`` tokens of ``metric`` ``[G, N, C]`` away and return the :class:`Merge` that applies it.

    The first ``protected`` tokens are never removed nor merged into; ``order`` is ``"paper"`` (the
    published rule, see the module docstring) or ``"spatial"``. ``r`` must already be capped at
    ``max_merge(N - protected)``. Random modes draw from ``generator`` (the global RNG when None), or, given a
    ``key``, from :func:`hashed_uniform` (the same draws for the same key, and no generator object, so a compiled
    forward stays one graph).
    """
    g, n, _ = metric.shape
    p = protected
    head, sort_staying, drops, hybrid = rule(p, mode, order)
    if r <= 0:
        return Merge(head=head)
    if r > max_merge(n - p):
        raise ValueError(f"r={r} exceeds half of the {n - p} mergeable tokens; cap it with max_merge()")
    n_a, n_b = (n - head + 1) // 2, (n - head) // 2
    # Protected tokens inside the alternation (paper order): A positions 0, 2, .. < p and B positions 1, 3, .. < p.
    pa, pb = ((p + 1) // 2, p // 2) if head == 0 else (0, 0)
    device = metric.device
    if metric.requires_grad:  # indices only: no autograd graph
        metric = metric.detach()
    if mode.startswith("random"):
        if key is not None:
            scores, pick = hashed_uniform(key, (2, g, n_a), device).unbind(0)
            partner = (pick * (n_b - pb)).long().clamp_(max=n_b - pb - 1) + pb
        else:
            scores = torch.rand(g, n_a, device=device, generator=generator)
            partner = torch.randint(n_b - pb, (g, n_a), device=device, generator=generator) + pb
    else:
        unit = metric[:, head:] if head else metric
        unit = unit / torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min_(1e-12)  # cosine
        sim = torch.bmm(unit[:, ::2], unit[:, 1::2].transpose(1, 2))
        if pb:
            sim[:, :, :pb] = -math.inf
        scores, partner = sim.max(dim=-1)
    if pa:
        scores[:, :pa] = -math.inf
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    keep_b = None
    if hybrid:  # a B token receiving any dissimilar A token is replaced by the A tokens
        src_idx = ranked[:, :r]
        similar = scores.gather(1, src_idx) >= threshold
        dissimilar_b = torch.zeros(g, n_a, dtype=torch.long, device=device)  # padded to n_a like dest_b
        dissimilar_b.scatter_add_(1, partner.gather(1, src_idx), (~similar).long())
        keep_b = dissimilar_b == 0
    dest = _destinations(head, r, n, ranked, sort_staying, None if drops else partner, keep_b)
    return Merge(head, r, ranked, sort_staying, dest, discards=drops or keep_b is not None)


def _int64(value: int) -> int:
    """A 64-bit constant as the signed int64 PyTorch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def hashed_uniform(key: int, shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """Uniform draws in [0, 1) ``[*shape]`` (float64) that depend only on ``key`` and their position: the
    SplitMix64 finaliser of ``key * golden + i`` for each position ``i`` (a counter-based generator, so the same
    key always gives the same draws, with no generator object or state)."""
    offset = (key * 0x9E3779B9) & ((1 << 62) - 1)  # any Python int key, within int64
    x = torch.arange(math.prod(shape), device=device, dtype=torch.int64) + offset
    x = x * _GOLDEN
    for shift, mul in ((30, _MIX1), (27, _MIX2)):
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * mul  # logical shift of the 64-bit pattern
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 11) & ((1 << 53) - 1)).double().div_(float(1 << 53)).view(shape)


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

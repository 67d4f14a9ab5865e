"""Token layouts: where the mergeable groups sit in a model's token sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Where the mergeable groups sit in a model's token sequence ``[B, N, D]``.

    ``protected`` leading tokens (a class token) are never merged. With ``frames=None`` (joint
    space-time) the whole clip is one group and the matching skips the protected tokens; with
    ``frames=T`` (divided space-time) each frame is a group, the protected tokens are set aside, and the
    frame tokens are stored time-minor (``index = p + slot*T + t``, TimeSformer) or time-major
    (``index = p + t*n + slot``).
    """

    protected: int = 0
    frames: int | None = None
    time_minor: bool = True

    @property
    def group_protected(self) -> int:
        """Protected tokens at the start of each group (joint layouts keep them in the group)."""
        return self.protected if self.frames is None else 0

    def split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, N, D]`` -> set-aside tokens ``[B, p, D]`` and groups ``[G, n, D]`` (views where possible)."""
        if self.frames is None:
            return t[:, :0], t
        head, body = t[:, : self.protected], t[:, self.protected :]
        b, m, d = body.shape
        f = self.frames
        if self.time_minor:
            body = body.reshape(b, m // f, f, d).transpose(1, 2)
        return head, body.reshape(b * f, m // f, d)

    def slot(self, index: Tensor, tokens: int) -> Tensor:
        """Frame slot (0-based, after the protected tokens) of token positions ``index`` in a divided layout of
        ``tokens`` tokens; protected tokens map to -1 - their position."""
        if self.frames is None:
            raise ValueError("slots exist in divided space-time layouts only")
        slots = (tokens - self.protected) // self.frames
        body = index - self.protected
        slot = body // self.frames if self.time_minor else body % slots
        return torch.where(body >= 0, slot, -1 - index)

    def join(self, head: Tensor, groups: Tensor) -> Tensor:
        """Inverse of :meth:`split` for any group length."""
        if self.frames is None:
            return groups
        g, n, d = groups.shape
        b, f = g // self.frames, self.frames
        groups = groups.reshape(b, f, n, d)
        groups = (groups.transpose(1, 2) if self.time_minor else groups).reshape(b, n * f, d)
        return torch.cat([head, groups], dim=1)

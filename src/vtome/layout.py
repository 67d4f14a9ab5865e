"""Token layouts: where the mergeable groups sit in a model's token sequence.

Owns: :class:`Layout`, the arithmetic between a model's token order ``[B, N, D]`` and the groups a merge step
matches in (a clip for joint attention, a frame for divided attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtome.merge import group_index


@dataclass(frozen=True)
class Layout:
    """Where the mergeable groups sit in a model's token sequence ``[B, N, D]``.

    ``protected`` leading tokens (a class token) are never merged. With ``frames=None`` (joint
    space-time) the whole clip is one group and the matching never removes nor merges into the protected
    tokens; with ``frames=T`` (divided space-time) each frame is a group, the protected tokens are set aside, and the
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

    def frame_positions(self, slot: Tensor, slots: int, missing: int | None = None) -> Tensor:
        """Divided layouts: per-frame slots ``slot`` ``[B*T, n]`` (the frames of a clip consecutive, as from
        :meth:`split`) as positions in the model's token order of a sequence with ``slots`` tokens per frame:
        ``[B, T*n]``, entry ``(b, j)`` for the ``j``-th frame token of clip ``b`` in model order (set-aside
        tokens not included). With ``missing``, negative slots give ``missing``."""
        f = self.frames
        b = slot.shape[0] // f
        slot = slot.view(b, f, slot.shape[-1])  # [B, T, n]
        frame = torch.arange(f, device=slot.device).view(1, f, 1)
        position = self.protected + (slot * f + frame if self.time_minor else frame * slots + slot)
        if missing is not None:
            position = torch.where(slot >= 0, position, missing)
        if self.time_minor:  # model order: slot-major
            position = position.transpose(1, 2)
        return position.reshape(b, position.shape[1] * position.shape[2])

    def token_index(self, dest: Tensor, out_slots: int, spare: bool) -> tuple[Tensor, int]:
        """Rows for :func:`vtome.merge.sum_tokens` that apply group destinations straight to the model's
        tokens ``[B, N, D]``, without regrouping them: ``dest`` ``[G, n]`` (as from :meth:`split`; -1 where a
        token is discarded) with ``out_slots`` tokens left per group -> (row index ``[B * N]``, ``N'`` tokens
        per clip). Set-aside tokens stay in front; with ``spare``, discarded tokens go to row ``B * N'``."""
        if self.frames is None:
            return group_index(dest, out_slots, spare), out_slots
        b, out_tokens = dest.shape[0] // self.frames, self.protected + self.frames * out_slots
        clip = torch.arange(0, b * out_tokens, out_tokens, device=dest.device).view(b, 1)  # first row of each clip
        position = self.frame_positions(dest, out_slots, -1 if spare else None)
        row = position + clip
        if spare:
            row = torch.where(position >= 0, row, b * out_tokens)
        if self.protected:
            row = torch.cat((clip + torch.arange(self.protected, device=dest.device), row), dim=1)
        return row.reshape(-1), out_tokens

    def global_index(self, index: Tensor | None, tokens: int) -> Tensor | None:
        """An index map (see :class:`vtome.merger.Track`) as positions in the current sequence of ``tokens``
        tokens: ``[B, N0]``, -1 where dropped (joint layouts: already so; None stays None)."""
        if index is None or self.frames is None:
            return index
        p = self.protected
        position = self.frame_positions(index, (tokens - p) // self.frames, missing=-1)
        head = torch.arange(p, device=index.device).expand(position.shape[0], p)
        return torch.cat([head, position], dim=1)

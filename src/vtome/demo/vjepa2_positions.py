"""Rotary positions in a merged V-JEPA 2, measured on the bundled demo model: ``python -m vtome.demo.vjepa2_positions``.

V-JEPA 2 has no position embedding: every attention rotates queries and keys by each token's (frame, row,
column). On held-out generated clips, at the ``r`` that keeps ``--flops`` of the FLOPs (pooler included), it
compares merged models that place merged tokens at the size-weighted mean of their patches (vtome's default)
or at their destination token's position, with:

- **naive positions**: what a patch that only merges tokens gets: the stock layer derives positions from
  token indices, so after the first merge every later token is rotated as if it sat at its index in the
  shortened sequence (a measurement helper here, not an option);
- **unweighted pooler**: the attentive pooler counting a merged token once instead of once per patch;
- random merging (the paper's control), no proportional attention, and dropping.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

import vtome
from vtome.adapters import vjepa2 as adapter
from vtome.adapters.inputs import clip_kwargs, clip_shape
from vtome.demo import checkpoints
from vtome.demo.synth import ClipSpec, is_temporal, make_batch, normalize
from vtome.merger import CapWarning


class _NaiveRopeAttention(adapter.VJEPA2RopeAttention):
    """Ignores the merged positions: the stock ids ``arange(N)`` of the current (shortened) sequence."""

    def forward(
        self,
        hidden_states: Tensor,
        position_mask: Tensor | None = None,
        positions: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        return super().forward(hidden_states, position_mask, None, bias)


class _UnweightedPooler(adapter.VJEPA2AttentivePooler):
    """The stock pooler on merged tokens: each counts once, whatever it covers."""

    def forward(self, hidden_state: Tensor, size: Tensor | None = None) -> Tensor:
        return super().forward(hidden_state, None)


DESTINATION = {"position_merge": "destination"}
# name -> (patch options, settings to assign after patching, helper class swap)
VARIANTS: dict[str, tuple[dict, dict, str | None]] = {
    "merge, mean positions (default)": ({"mode": "merge"}, {}, None),
    "merge, destination positions": ({"mode": "merge"}, DESTINATION, None),
    "merge, naive positions (stock ids)": ({"mode": "merge"}, {}, "naive"),
    "merge, pooler not size-weighted": ({"mode": "merge"}, {}, "unweighted"),
    "merge, no proportional attention": ({"mode": "merge", "prop_attn": False}, {}, None),
    "random merge, mean positions": ({"mode": "random_merge", "seed": 0}, {}, None),
    "random merge, destination positions": ({"mode": "random_merge", "seed": 0}, DESTINATION, None),
    "drop (positions exact)": ({"mode": "drop"}, {}, None),
    "drop, naive positions (stock ids)": ({"mode": "drop"}, {}, "naive"),
}


def variant(base: nn.Module, name: str, flops: float) -> nn.Module:
    """A patched copy of ``base`` for the row ``name`` of :data:`VARIANTS`, at a FLOP budget of ``flops``."""
    options, assigned, helper = VARIANTS[name]
    model = vtome.patch(copy.deepcopy(base), flops=flops, **options)
    for key, value in assigned.items():
        setattr(vtome.settings(model), key, value)
    if helper == "naive":
        for layer in adapter.ADAPTER.layers(model):
            layer.attention.__class__ = _NaiveRopeAttention
    elif helper == "unweighted":
        model.pooler.__class__ = _UnweightedPooler
    return model


@torch.inference_mode()
def accuracy(model: nn.Module, clips: Tensor, labels: Tensor, batch: int = 25) -> dict[str, float]:
    """Top-1 accuracy on clips ``[N, T, C, H, W]``: overall, appearance classes, temporal classes."""
    hits: dict[str, list[bool]] = {"appearance": [], "temporal": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        for i in range(0, len(clips), batch):
            pred = model(**clip_kwargs(model, clips[i : i + batch])).logits.argmax(-1)
            for label, p in zip(labels[i : i + batch].tolist(), pred.tolist()):
                hits["temporal" if is_temporal(label) else "appearance"].append(label == p)
    both = hits["appearance"] + hits["temporal"]
    return {
        "acc": sum(both) / len(both),
        "acc_appearance": sum(hits["appearance"]) / max(len(hits["appearance"]), 1),
        "acc_temporal": sum(hits["temporal"]) / max(len(hits["temporal"]), 1),
    }


def measure(clips: int = 300, flops: float = 0.5, seed: int = 0, names: Sequence[str] | None = None) -> list[dict]:
    """One row per variant (the unmerged model first) on the first ``clips`` held-out clips."""
    base = checkpoints.load("vjepa2")
    frames, _, size = clip_shape(base)
    x, labels = make_batch(seed, "test", range(clips), ClipSpec(frames=frames, size=size))
    x = normalize(x)
    rows = [{"variant": "unmerged", "r": 0, "flop_ratio": 1.0, **accuracy(base, x, labels)}]
    for name in names or VARIANTS:
        model = variant(base, name, flops)
        start = time.perf_counter()
        acc = accuracy(model, x, labels)
        rows.append(
            {
                "variant": name,
                "r": vtome.settings(model).r,
                "flop_ratio": vtome.last_run(model).flop_ratio,
                **acc,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| variant | r | FLOP ratio | accuracy | appearance | temporal |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['r']} | {row['flop_ratio']:.2f}x | {row['acc']:.1%} | "
            f"{row['acc_appearance']:.1%} | {row['acc_temporal']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtome.demo.vjepa2_positions", description=__doc__)
    p.add_argument("--clips", type=int, default=300, help="held-out clips (20 per class at 300)")
    p.add_argument("--flops", type=float, default=0.5, help="fraction of the FLOPs to keep (0.5: ~2x fewer)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = measure(args.clips, args.flops)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

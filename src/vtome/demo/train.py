"""Train a demo classifier on generated clips (CPU, minutes): ``python -m vtome.demo.train --family joint``.

Data are generated on the fly (every step sees new clips, so there is no over-fitting to a fixed set);
the held-out accuracy is measured on the ``test`` split, which training never sees.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from vtome.adapters.inputs import clip_kwargs, clip_shape
from vtome.demo import checkpoints
from vtome.demo.synth import ClipSpec, is_temporal, make_batch, normalize, reversed_label


def reverse_half(clips: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Time-reversal augmentation: a random half of the clips ``[B, T, ...]`` played backwards, with
    their labels mapped to the reversed class, so that frame order is the only way to tell the twins."""
    flip = torch.rand(len(clips), generator=g) < 0.5
    clips = torch.where(flip[:, None, None, None, None], clips.flip(1), clips)
    labels = torch.tensor([reversed_label(y) if f else y for y, f in zip(labels.tolist(), flip.tolist())])
    return clips, labels


def spec_for(model: nn.Module) -> ClipSpec:
    frames, _, size = clip_shape(model)
    return ClipSpec(frames=frames, size=size)


@torch.inference_mode()
def evaluate(model: nn.Module, seed: int, split: str, count: int, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of ``model`` on the first ``count`` clips of ``split``: overall, appearance, temporal."""
    model.eval()
    spec = spec_for(model)
    hits = {"appearance": [], "temporal": []}
    for start in range(0, count, batch_size):
        clips, labels = make_batch(seed, split, range(start, min(start + batch_size, count)), spec)
        pred = model(**clip_kwargs(model, normalize(clips))).logits.argmax(-1)
        for label, p in zip(labels.tolist(), pred.tolist()):
            hits["temporal" if is_temporal(label) else "appearance"].append(label == p)
    everything = hits["appearance"] + hits["temporal"]
    return {
        "acc": sum(everything) / len(everything),
        "acc_appearance": sum(hits["appearance"]) / max(len(hits["appearance"]), 1),
        "acc_temporal": sum(hits["temporal"]) / max(len(hits["temporal"]), 1),
        "clips": len(everything),
    }


def train(
    family: str,
    out: Path | None,
    *,
    steps: int = 800,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    data_seed: int = 0,
    eval_clips: int = 450,
    log_every: int = 50,
    overrides: dict | None = None,
    command: str = "",
    reverse: bool = False,
) -> dict:
    """Train ``family`` for ``steps`` steps of ``batch_size`` generated clips; save to ``out`` if given."""
    torch.manual_seed(seed)
    model = checkpoints.build(family, **(overrides or {}))
    spec = spec_for(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.time()
    for step in range(steps):
        model.train()
        clips, labels = make_batch(data_seed, "train", range(step * batch_size, (step + 1) * batch_size), spec)
        if reverse:
            clips, labels = reverse_half(clips, labels, torch.Generator().manual_seed(seed * 100_003 + step))
        loss = model(**clip_kwargs(model, normalize(clips)), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start
    result = evaluate(model, data_seed, "test", eval_clips)
    record = {
        "family": family,
        "command": command,
        "seed": seed,
        "data_seed": data_seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "time_reversal_augmentation": reverse,
        "train_seconds": round(train_seconds, 1),
        "test": result,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }
    print(json.dumps(record["test"]), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        checkpoints.write_processor_config(out, spec.size)
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtome.demo.train", description=__doc__)
    p.add_argument("--family", required=True, choices=sorted(checkpoints.ALL_FAMILIES))
    p.add_argument("--out", type=Path, help="directory for the trained model (default: the bundled weights)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-clips", type=int, default=450)
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32 px model (for tests)")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="time-reversal augmentation (half of each batch backwards, temporal labels swapped)",
    )
    args = p.parse_args(argv)
    overrides = (
        {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "image_size": 32} if args.tiny else {}
    )
    out = args.out or checkpoints.weights_dir(args.family)
    command = "python -m vtome.demo.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    train(
        args.family,
        out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_clips=args.eval_clips,
        overrides=overrides,
        command=command,
        reverse=args.reverse,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

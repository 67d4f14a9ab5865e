"""Train a demo classifier on generated clips (CPU, minutes): ``python -m vtome.demo.train --family joint``;
or fine-tune a bundled one with token merging at a FLOP budget:
``python -m vtome.demo.train --init demo-joint --flops 0.5 --steps 150 --reverse --out runs/joint-half``.

Data are generated on the fly (every step sees new clips, so there is no over-fitting to a fixed set);
the held-out accuracy is measured on the ``test`` split, which training never sees. A fine-tuning run starts
at the first training clip its bundled model never saw, and never writes over the bundled weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

import vtome
from vtome.adapters.inputs import clip_kwargs, clip_shape
from vtome.demo import checkpoints
from vtome.demo.synth import ClipSpec, is_temporal, make_batch, normalize, reversed_label

SCRATCH_LR, FINETUNE_LR = 2e-3, 2e-4  # peak learning rates: a new model, fine-tuning a bundled one
_TINY = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "image_size": 32}


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
    init: bool = False,
    merge: dict | None = None,
) -> dict:
    """Train ``family`` for ``steps`` steps of ``batch_size`` generated clips; save to ``out`` if given.

    ``init``: start from the bundled trained model of ``family`` (fine-tuning; its clips are skipped) instead
    of a new one. ``merge``: :func:`vtome.patch` arguments (``flops`` or ``r``, ``mode``, ...): train, and
    evaluate, with token merging; the saved model is a stock model (patch it again with the same settings).
    """
    torch.manual_seed(seed)
    model = checkpoints.load(family) if init else checkpoints.build(family, **(overrides or {}))
    # a fine-tuning run draws the training clips after those its starting model was trained on
    first_clip = _clips_seen(checkpoints.training_record(family)) if init else 0
    if merge:
        vtome.patch(model, **merge)
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
        start_clip = first_clip + step * batch_size
        clips, labels = make_batch(data_seed, "train", range(start_clip, start_clip + batch_size), spec)
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
    result = evaluate(model, data_seed, "test", eval_clips)  # as trained: merged when merging
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
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "test": result,
        **({"init": checkpoints.ALL_FAMILIES[family], "first_clip": first_clip} if init else {}),
        **({"merge": merge_record(model, merge)} if merge else {}),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }
    print(json.dumps(record["test"]), flush=True)
    if merge:  # the same model without merging, on the same clips
        vtome.unpatch(model)
        record["test_unpatched"] = evaluate(model, data_seed, "test", eval_clips)
        print("unpatched", json.dumps(record["test_unpatched"]), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        checkpoints.write_processor_config(out, spec.size)
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _clips_seen(record: dict) -> int:
    """Training clips a model's ``training.json`` record says it was trained on (from index 0 on, plus its own
    fine-tuning start)."""
    return record.get("first_clip", 0) + record["steps"] * record["batch_size"]


def merge_record(model: nn.Module, merge: dict) -> dict:
    """What a patched ``model`` trained with (:func:`vtome.patch` arguments ``merge``): the arguments, the
    ``r`` they resolved to and ``flop_ratio`` (unpatched / patched FLOPs) of its last forward."""
    settings = vtome.settings(model)
    r = settings.r
    return {
        **merge,
        "r": list(r) if isinstance(r, (list, tuple)) else r,
        "prop_attn": settings.prop_attn,
        "flop_ratio": round(vtome.last_run(model).flop_ratio, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtome.demo.train", description=__doc__)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--family", choices=sorted(checkpoints.ALL_FAMILIES), help="train a new model of this family")
    start.add_argument(
        "--init",
        choices=sorted(checkpoints.ALL_FAMILIES.values()),
        help="fine-tune this bundled model (needs --out; the bundled weights are never written)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="directory for the trained model (default for --family: the bundled weights; required with --init)",
    )
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {SCRATCH_LR:g}; {FINETUNE_LR:g} with --init)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--flops", type=float, help="train with token merging, keeping this fraction of the FLOPs (0.5: half)"
    )
    budget.add_argument("--r", type=int, help="train with token merging, removing r tokens per layer")
    p.add_argument("--mode", choices=vtome.MODES, help="reduction mode with --flops/--r (default merge)")
    p.add_argument("--threshold", type=float, help="hybrid mode: similarity from which a pair merges (default 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-clips", type=int, default=450)
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32 px model (for tests)")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="time-reversal augmentation (half of each batch backwards, temporal labels swapped)",
    )
    args = p.parse_args(argv)
    family = args.family or next(f for f, name in checkpoints.ALL_FAMILIES.items() if name == args.init)
    merging = args.flops is not None or args.r is not None
    if not merging and (args.mode or args.threshold is not None):
        p.error("--mode and --threshold go with --flops or --r (training with merging)")
    if args.threshold is not None and args.mode != "hybrid":
        p.error("--threshold is for --mode hybrid")
    if merging and args.out is None:
        p.error("training with --flops/--r needs --out DIR (the bundled weights are trained without merging)")
    if args.init and args.tiny:
        p.error("--tiny builds a new model; it does not go with --init")
    if args.init:
        if args.out is None:
            p.error(f"--init {args.init} needs --out DIR (a new folder for the fine-tuned model)")
        if args.out.resolve().is_relative_to(checkpoints.WEIGHTS.resolve()):
            p.error(f"--out {args.out} is inside the bundled weights ({checkpoints.WEIGHTS}); choose another folder")
        if (args.out / "model.safetensors").exists():
            p.error(f"--out {args.out} already holds a model; choose a new folder (or delete that one)")
    merge = None
    if merging:
        mode = args.mode or "merge"
        merge = {"mode": mode, **({"flops": args.flops} if args.flops is not None else {"r": args.r})}
        if mode == "hybrid":
            merge["threshold"] = 0.8 if args.threshold is None else args.threshold
        try:  # the settings' own checks, before any training (on a tiny model: its budget warnings are moot)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vtome.patch(checkpoints.build(family, **_TINY), **merge)
        except ValueError as err:
            p.error(str(err))
    overrides = _TINY if args.tiny else {}
    out = args.out or checkpoints.weights_dir(family)
    command = "python -m vtome.demo.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    train(
        family,
        out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (FINETUNE_LR if args.init else SCRATCH_LR),
        seed=args.seed,
        eval_clips=args.eval_clips,
        overrides=overrides,
        command=command,
        reverse=args.reverse,
        init=args.init is not None,
        merge=merge,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

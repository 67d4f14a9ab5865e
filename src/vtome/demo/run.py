"""``vtome demo``: the method end to end, offline, on the bundled models and generated held-out clips."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

import vtome
from vtome.demo import checkpoints
from vtome.demo.synth import ClipSpec, is_temporal, make_batch, make_clip, normalize
from vtome.merger import CapWarning
from vtome.patch import last_run_flops

MODES = ("merge", "drop", "random_merge", "random_drop", "hybrid")


@dataclass
class DemoConfig:
    clips: int = 300  # held-out clips per model (20 per class)
    target_flop_ratio: float = 2.0
    threshold: float = 0.8  # hybrid: the paper's VideoMAE value
    batch_size: int = 25
    seed: int = 0  # data seed of the bundled models' held-out split


def flop_ratio(model: nn.Module, clip: torch.Tensor) -> float:
    """FLOP ratio (unpatched / patched) of a patched ``model`` from one forward of ``clip``."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        model(pixel_values=clip)
    unmerged, merged = last_run_flops(model)
    return unmerged / merged


def r_for_flop_ratio(model: nn.Module, target: float, clip: torch.Tensor) -> int:
    """Smallest constant ``r`` at which a merged copy of ``model`` reaches ``target`` FLOP ratio; where no ``r``
    does (every layer already merges all it can), the smallest ``r`` reaching the largest ratio there is."""
    probe = vtome.patch(copy.deepcopy(model), r=0)

    def ratio_at(r: int) -> float:
        vtome.settings(probe).r = r
        return flop_ratio(probe, clip)

    hi = max(1, probe.config.hidden_size)  # grows until the target is reached or r stops mattering
    while (best := ratio_at(hi)) < target and hi <= 10_000:
        hi *= 2
    goal, lo = min(target, best) - 1e-9, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ratio_at(mid) >= goal else (mid, hi)
    return hi


def _accuracy(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[dict, float]:
    hits = {"appearance": [], "temporal": []}
    start = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        for i in range(0, len(clips), batch):
            pred = model(pixel_values=clips[i : i + batch]).logits.argmax(-1)
            for label, p in zip(labels[i : i + batch].tolist(), pred.tolist()):
                hits["temporal" if is_temporal(label) else "appearance"].append(label == p)
    seconds = time.perf_counter() - start
    acc = {k: sum(v) / max(len(v), 1) for k, v in hits.items()}
    both = hits["appearance"] + hits["temporal"]
    return {"acc": sum(both) / len(both), "acc_appearance": acc["appearance"], "acc_temporal": acc["temporal"]}, (
        len(clips) / seconds
    )


def run_demo(cfg: DemoConfig, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Accuracy and speed of each bundled model unpatched and in every mode at ~``target_flop_ratio``."""
    rows = []
    for family, name in checkpoints.FAMILIES.items():
        base = checkpoints.load(family)
        spec = ClipSpec(frames=base.config.num_frames, size=base.config.image_size)
        clips, labels = make_batch(cfg.seed, "test", range(cfg.clips), spec)
        clips = normalize(clips)
        r = r_for_flop_ratio(base, cfg.target_flop_ratio, clips[:1])
        variants = [("none", 0, base)]
        for mode in MODES:
            model = vtome.patch(copy.deepcopy(base), r=r, mode=mode, threshold=cfg.threshold, seed=0)
            variants.append((mode, r, model))
        base_speed = None
        for mode, r_used, model in variants:
            acc, speed = _accuracy(model, clips, labels, cfg.batch_size)
            base_speed = base_speed or speed
            row = {
                "model": name,
                "architecture": type(base).__name__,
                "mode": mode,
                "r": r_used,
                **acc,
                "flop_ratio": 1.0 if r_used == 0 else flop_ratio(model, clips[:1]),
                "clips_per_s": speed,
                "speedup": speed / base_speed,
                "clips": len(clips),
            }
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def write_visualizations(out: str, cfg: DemoConfig, clip_index: int = 7) -> list[str]:
    """Merge groups of one held-out clip for each bundled model (merge mode, the demo's r), under ``out``."""
    from vtome.data.transforms import preprocess_for
    from vtome.visualize import clip_from_frames, save_frames, visualize_clip
    from vtome.zoo import model_source

    written = []
    for family, name in checkpoints.FAMILIES.items():
        model = checkpoints.load(family)
        spec = ClipSpec(frames=model.config.num_frames, size=model.config.image_size)
        clip, _ = make_clip(cfg.seed, "test", clip_index, spec)
        frames = (clip.permute(0, 2, 3, 1) * 255).round().byte().numpy()
        shown = clip_from_frames(frames, preprocess_for(model, model_source(name)))
        r = r_for_flop_ratio(model, cfg.target_flop_ratio, shown.pixel_values)
        drawn, _ = visualize_clip(model, shown, r=r)
        written.append(str(save_frames(drawn, out, name=f"{name}_merges")["png"]))
    return written

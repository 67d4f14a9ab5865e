"""``vtome sweep``: accuracy against speed over r values and modes (the paper's Figure 3).

Each setting is one resumable evaluation in its own folder under ``out``, named from the full settings: a
readable prefix (``baseline``, or ``<mode>_r<r>_s<start layer>[_l<layers>]``) and a short hash of every
option that determines a prediction (model, data, merge settings, threshold, prop_attn, views, sampling),
so runs with different settings never share a folder. Two sweeps into one ``out`` at once are refused
(a lock). Speedup is the evaluation's model throughput relative to the baseline's; the FLOP
ratio comes from the token counts of one forward.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import vtome
from vtome.adapters.inputs import clip_kwargs, clip_shape
from vtome.evaluate import EvalConfig, apply_merge, model_identity, run_eval
from vtome.merger import CapWarning
from vtome.outdir import RunLock, prepare, write_error
from vtome.patch import last_run_flops

COLUMNS = (
    "mode",
    "r",
    "start_layer",
    "placement",
    "layers",
    "top1",
    "top5",
    "clips_per_s",
    "speedup",
    "flop_ratio",
    "num_failed",
    "out",
)


def flop_ratio(model_name: str | torch.nn.Module, **patch_kwargs: object) -> float:
    """FLOP ratio of ``model_name`` patched with ``patch_kwargs``, from one forward of a random clip."""
    from vtome.zoo import load_model

    model = copy.deepcopy(model_name) if isinstance(model_name, torch.nn.Module) else load_model(model_name)
    vtome.patch(model, **patch_kwargs)
    frames, channels, size = clip_shape(model)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        model(**clip_kwargs(model, torch.randn(1, frames, channels, size, size)))
    unmerged, merged = last_run_flops(model)
    return unmerged / merged


def settings_grid(
    rs: list[int], modes: list[str], start_layers: list[int] | None = None, layers: list[int] | None = None
) -> list[dict]:
    """The baseline, then every (mode, r > 0, start layer) combination, merging in ``layers`` (None: all)."""
    grid = [{"mode": "none", "r": 0, "start_layer": 0, "placement": "", "layers": None}]
    for mode in modes:
        for r in (r for r in rs if r > 0):
            for start in start_layers or [0]:
                grid.append({"mode": mode, "r": r, "start_layer": start, "placement": "", "layers": layers})
    return grid


def placements(num_layers: int) -> dict[str, list[int]]:
    """Named sets of merging layers: all, each half, each third (a set already named is not repeated)."""
    third = max(1, num_layers // 3)
    half = max(1, num_layers // 2)
    named = {
        "all": list(range(num_layers)),
        "first half": list(range(half)),
        "second half": list(range(half, num_layers)),
        "early third": list(range(third)),
        "middle third": list(range(third, min(2 * third, num_layers))),
        "late third": list(range(num_layers - third, num_layers)),
    }
    unique: dict[str, list[int]] = {}
    for name, layers in named.items():
        if layers and layers not in unique.values():
            unique[name] = layers
    return unique


def placement_grid(rs: list[int], modes: list[str], num_layers: int) -> list[dict]:
    """The baseline, then each placement at equal total token reduction: ``r * num_layers`` tokens
    removed in all, spread evenly over the placement's layers (before capping)."""
    grid = settings_grid([], modes)
    for mode in modes:
        for r in (r for r in rs if r > 0):
            for name, layers in placements(num_layers).items():
                per_layer = round(r * num_layers / len(layers))
                grid.append(
                    {
                        "mode": mode,
                        "r": per_layer,
                        "start_layer": 0,
                        "placement": f"{name} (r={r} all)",
                        "layers": layers,
                    }
                )
    return grid


def sweep_grid(
    model: str | torch.nn.Module,
    rs: list[int],
    modes: list[str],
    start_layers: list[int] | None = None,
    layers: list[int] | None = None,
    placement: bool = False,
) -> list[dict]:
    """The settings of a sweep: :func:`settings_grid`, or with ``placement`` :func:`placement_grid` (which
    chooses the merging layers itself, so ``layers`` and ``start_layers`` other than ``[0]`` are refused
    rather than ignored). A value listed twice is refused too."""
    for flag, values in (("--r", rs), ("--modes", modes), ("--start-layers", start_layers or [])):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise ValueError(f"{flag} lists {twice} twice; give each value once")
    if not placement:
        return settings_grid(rs, modes, start_layers, layers)
    if layers is not None:
        raise ValueError(
            "--layers has no effect with --placements, which compares its own layer sets (all, halves, thirds); "
            "drop one of the two"
        )
    if start_layers not in (None, [0]):
        raise ValueError(
            f"--start-layers {','.join(map(str, start_layers))} has no effect with --placements, which compares its "
            "own layer sets (all, halves, thirds); drop one of the two"
        )
    from vtome.zoo import load_model

    probe = model if isinstance(model, torch.nn.Module) else load_model(model)
    return placement_grid(rs, modes, probe.config.num_hidden_layers)


# EvalConfig fields that do not change a prediction (every other field, new ones included, names the folder).
_NOT_SETTINGS = ("out", "batch_size", "workers", "limit", "progress")


def folder_name(cfg: EvalConfig) -> str:
    """``baseline-<hash>`` or ``<mode>_r<r>_s<start>[_l<layers>]-<hash>``; the hash covers every field of
    ``cfg`` that determines a prediction (merge settings are left out for the unpatched baseline)."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_SETTINGS}
    for key in ("model", "noun_model"):
        value = settings[key]
        if isinstance(value, torch.nn.Module):
            settings[key] = model_identity(value, value)
        elif isinstance(value, str) and os.path.exists(value):
            settings[key] = os.path.abspath(value)
    for key in ("root", "split", "labels"):
        if isinstance(settings[key], str) and os.path.exists(settings[key]):
            settings[key] = os.path.abspath(settings[key])
    if cfg.r == 0:
        for key in ("r", "mode", "prop_attn", "threshold", "start_layer", "layers", "extra"):
            settings.pop(key)
        prefix = "baseline"
    else:
        prefix = f"{cfg.mode}_r{cfg.r}_s{cfg.start_layer}"
        if cfg.layers is not None:
            prefix += "_l" + "-".join(map(str, cfg.layers))
    prefix = "".join(c if c.isalnum() or c in "_-." else "-" for c in prefix)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def run_sweep(
    base: EvalConfig,
    grid: list[dict],
    on_setting: Callable[[dict], None] | None = None,
    eval_progress: Callable[[int, int, float | None], None] | None = None,
) -> list[dict]:
    """Evaluate every setting of ``grid`` (dicts with ``mode``, ``r``, ``start_layer``); writes
    ``sweep.csv`` and ``sweep.png`` under ``base.out``."""
    out = Path(base.out)
    rank = int(os.environ.get("RANK", "0"))
    lock = RunLock(out, "vtome sweep")
    configs = []
    for setting in grid:
        mode = setting["mode"] if setting["r"] else base.mode
        merging = {"r": setting["r"], "mode": mode, "start_layer": setting["start_layer"], "layers": setting["layers"]}
        cfg = dataclasses.replace(base, **merging)
        configs.append((setting, merging, dataclasses.replace(cfg, out=str(out / folder_name(cfg)))))
    for _, _, cfg in configs:
        cfg.validate()
    from vtome.zoo import load_model

    probe = base.model if isinstance(base.model, torch.nn.Module) else load_model(base.model)
    for _, _, cfg in configs:  # every setting checked before the first evaluation
        apply_merge(probe, cfg, keep=False)
    if rank == 0:
        prepare(out)
        lock.acquire()
    try:
        rows = []
        for setting, merging, cfg in configs:
            if on_setting:
                on_setting(setting)
            summary = run_eval(cfg, eval_progress)
            ratio = (
                1.0 if setting["r"] == 0 else flop_ratio(base.model, threshold=base.threshold, **merging, **base.extra)
            )
            rows.append(
                {
                    **setting,
                    "top1": summary["top1"],
                    "top5": summary["top5"],
                    "clips_per_s": summary["clips_per_s"],
                    "flop_ratio": ratio,
                    "num_failed": summary["num_failed"],
                    "out": cfg.out,
                }
            )
        base_speed = rows[0]["clips_per_s"]
        for row in rows:
            row["speedup"] = row["clips_per_s"] / base_speed if base_speed and row["clips_per_s"] else None
        if rank == 0:
            try:
                tmp = out / "sweep.csv.tmp"  # a kill mid-write leaves the previous sweep.csv whole
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=COLUMNS)
                    writer.writeheader()
                    writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
                tmp.replace(out / "sweep.csv")
                title = f"{base.model if isinstance(base.model, str) else ''} {base.dataset}"
                plot_sweep(rows, out / "sweep.png", title=title)
            except OSError as err:
                raise write_error(out / "sweep.csv", err) from None
    finally:
        lock.release()
    return rows


def plot_sweep(rows: list[dict], path: Path, title: str = "") -> None:
    """Top-1 accuracy against speedup (measured, or the FLOP ratio where no timing is known), one line
    per mode, the baseline as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def speed(row: dict) -> float:
        return row["speedup"] if row["speedup"] is not None else row["flop_ratio"]

    fig, ax = plt.subplots(figsize=(6, 4))
    base = rows[0]

    def series(row: dict) -> tuple:
        where = row["placement"].split(" (")[0] if row["placement"] else ""
        return row["mode"], row["start_layer"], where

    for mode, start, where in dict.fromkeys(series(r) for r in rows[1:]):
        mine = sorted((r for r in rows[1:] if series(r) == (mode, start, where)), key=lambda r: r["r"])
        label = mode + (f", from layer {start}" if start else "") + (f", {where}" if where else "")
        xs, ys = [speed(base)] + [speed(r) for r in mine], [100 * base["top1"]] + [100 * r["top1"] for r in mine]
        ax.plot(xs, ys, "o-", label=label)
        for r in mine:
            ax.annotate(
                f"r={r['r']}", (speed(r), 100 * r["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.plot([speed(base)], [100 * base["top1"]], "k*", markersize=12, label="unpatched")
    ax.set_xlabel("speedup (measured model throughput vs unpatched)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title.strip(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

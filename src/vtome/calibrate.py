"""``vtome calibrate``: which ``r`` gives a wanted speedup (or FLOP budget) on this device and batch size.

The FLOP model says how much work merging removes; what that buys depends on the device, the batch size
and the fixed cost of each merge step. This tool measures it: it resolves a ladder of FLOP budgets to
``r`` values, times them against the unpatched model with the benchmark's interleaved method
(:mod:`vtome.bench`), fits where the measured speedup curve meets the target, and confirms that ``r`` with a
second measurement. When no ``r`` gains 5%, it says so and looks for the smallest batch size that does.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import vtome
from vtome.bench import BenchConfig, run_benchmark
from vtome.flops import BudgetWarning
from vtome.merger import CapWarning

PAYS = 1.05  # a measured speedup below this is "does not pay"
LADDER = (0.85, 0.7, 0.55, 0.45, 0.35)  # FLOP fractions measured when looking for a speedup target


@dataclass
class CalibrateConfig:
    """What to calibrate. Give ``target_speedup`` or ``flops`` (neither: measure the ladder only)."""

    model: str
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    attn: str = "sdpa"
    mode: str = "merge"
    target_speedup: float | None = None
    flops: float | None = None
    ladder: tuple[float, ...] = field(default=LADDER)
    warmup: int = 2
    repeats: int = 5
    threads: int | None = None
    max_batch_size: int = 64
    extra: dict = field(default_factory=dict)  # further vtome.patch keyword arguments (start_layer, order, ...)

    def validate(self) -> None:
        """``ValueError`` naming the field that is wrong (the CLI names its flag instead)."""
        if self.target_speedup is not None and self.flops is not None:
            raise ValueError("give target_speedup or flops, not both")
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise ValueError(f"target_speedup must be > 1 (e.g. 2 for twice as fast); got {self.target_speedup}")
        if self.flops is not None and not 0.0 < self.flops < 1.0:
            raise ValueError(f"flops is the fraction of the FLOPs to keep, in (0, 1) (e.g. 0.5); got {self.flops}")
        if self.batch_size < 1 or self.max_batch_size < self.batch_size:
            raise ValueError(f"batch_size must be >= 1 and <= max_batch_size; got {self.batch_size}")

    def bench(self, rs: list[int], batch_size: int) -> BenchConfig:
        return BenchConfig(
            model=self.model,
            rs=[0, *rs],
            mode=self.mode,
            batch_sizes=[batch_size],
            device=self.device,
            dtype=self.dtype,
            attn=self.attn,
            warmup=self.warmup,
            repeats=self.repeats,
            threads=self.threads,
            extra=dict(self.extra),
        )


def r_for_budgets(model_name: str, budgets: list[float], **patch_kwargs: object) -> dict[float, int]:
    """The constant ``r`` each FLOP budget resolves to for ``model_name`` (:func:`vtome.patch` ``flops=``,
    with ``patch_kwargs`` such as ``start_layer`` or ``layers`` that change the resolution)."""
    from vtome.zoo import load_model

    base = load_model(model_name)
    chosen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        for budget in budgets:
            chosen[budget] = vtome.settings(vtome.patch(copy.deepcopy(base), flops=budget, **patch_kwargs)).r
    return chosen


def _crossing(rows: list[dict], target: float) -> int | None:
    """``r`` where the measured speedup curve (rows sorted by r) first reaches ``target``, by linear
    interpolation between the two measured points around it (rounded up); None if it never does."""
    previous = {"r": 0, "speedup": 1.0}
    for row in rows:
        if row["speedup"] >= target:
            gain = row["speedup"] - previous["speedup"]
            if gain <= 0:
                return row["r"]
            r = previous["r"] + (target - previous["speedup"]) * (row["r"] - previous["r"]) / gain
            return max(1, min(row["r"], math.ceil(round(r, 6))))
        previous = row
    return None


def calibrate(cfg: CalibrateConfig, on_step: Callable[[str], None] | None = None) -> dict[str, object]:
    """Measure speedup against ``r`` and recommend an ``r``; returns a JSON-able report (see module doc)."""
    cfg.validate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        budgets = [cfg.flops] if cfg.flops is not None else list(cfg.ladder)
        chosen = r_for_budgets(cfg.model, budgets, mode=cfg.mode, **cfg.extra)
        rs = sorted(set(chosen.values()) - {0})
        if not rs:
            raise ValueError(f"no budget in {budgets} makes {cfg.model} merge anything")
        report = run_benchmark(cfg.bench(rs, cfg.batch_size), on_step)
        curve = sorted((row for row in report["results"] if not row["baseline"]), key=lambda row: row["r"])
        best = max(curve, key=lambda row: row["speedup"])
        recommendation: dict[str, object] | None = None
        if cfg.flops is not None:
            recommendation = _summary(curve[0], "flops")
        elif cfg.target_speedup is not None:
            r = _crossing(curve, cfg.target_speedup)
            if r is not None:
                confirm = run_benchmark(cfg.bench([r], cfg.batch_size), on_step)["results"][-1]
                recommendation = _summary(confirm, "target_speedup")
                report["results"].append(confirm)
        pays = best["speedup"] >= PAYS
        pays_from = None
        tried: list[dict] = []
        if not pays:  # look for the smallest batch size at which the most merging pays
            batch = cfg.batch_size * 2
            while batch <= cfg.max_batch_size:
                row = run_benchmark(cfg.bench([curve[-1]["r"]], batch), on_step)["results"][-1]
                tried.append(_summary(row, "larger_batch"))
                if row["speedup"] >= PAYS:
                    pays_from = batch
                    break
                batch *= 2
    return {
        "machine": report["machine"],
        "config": {k: v for k, v in cfg.__dict__.items()},
        "results": report["results"],
        "budgets": {str(k): v for k, v in chosen.items()},
        "best": _summary(best, "best"),
        "recommendation": recommendation,
        "pays": pays,
        "pays_from_batch_size": pays_from,
        "larger_batches": tried,
    }


def _summary(row: dict, why: str) -> dict[str, object]:
    keys = ("r", "batch_size", "flop_ratio", "speedup", "clips_per_s", "overhead_share")
    return {"why": why, **{k: row[k] for k in keys}}


def verdict(report: dict[str, object]) -> list[str]:
    """Plain sentences saying what the calibration found."""
    cfg, best, rec = report["config"], report["best"], report["recommendation"]
    where = f"{cfg['device']}, {cfg['dtype']}, batch {cfg['batch_size']}"
    lines = []
    if rec is not None and rec["why"] == "target_speedup":
        lines.append(
            f"use r={rec['r']}: measured {rec['speedup']:.2f}x faster ({rec['flop_ratio']:.2f}x fewer FLOPs) "
            f"on {where}, for a target of {cfg['target_speedup']:.2f}x"
        )
    elif rec is not None:
        lines.append(
            f"flops={cfg['flops']} is r={rec['r']} ({rec['flop_ratio']:.2f}x fewer FLOPs): measured "
            f"{rec['speedup']:.2f}x faster on {where}"
        )
    elif cfg["target_speedup"] is not None:
        lines.append(
            f"no r reaches {cfg['target_speedup']:.2f}x on {where}: the best measured is {best['speedup']:.2f}x "
            f"at r={best['r']} ({best['flop_ratio']:.2f}x fewer FLOPs)"
        )
    if not report["pays"]:
        lines.append(
            f"merging does not pay on {where}: below {PAYS:.2f}x at every r measured (best {best['speedup']:.2f}x); "
            "the fixed cost of each merge step eats the saved work"
        )
        batch = report["pays_from_batch_size"]
        lines.append(
            f"it pays from batch size {batch}"
            if batch
            else f"it does not pay at any batch size up to {cfg['max_batch_size']} either"
        )
    return lines

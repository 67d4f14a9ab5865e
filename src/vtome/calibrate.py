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
MAX_BATCH_SIZE = 4096  # bound on --max-batch-size (the doubling search also stops where memory would run out)
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

        def whole(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.target_speedup is not None and self.flops is not None:
            raise ValueError("give target_speedup or flops, not both")
        if self.target_speedup is not None and not 1.0 < self.target_speedup < math.inf:
            raise ValueError(f"target_speedup must be > 1 (e.g. 2 for twice as fast); got {self.target_speedup}")
        if self.flops is not None and not 0.0 < self.flops < 1.0:
            raise ValueError(f"flops is the fraction of the FLOPs to keep, in (0, 1) (e.g. 0.5); got {self.flops}")
        if not whole(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}; got {self.batch_size!r}")
        if not whole(self.max_batch_size) or not self.batch_size <= self.max_batch_size <= MAX_BATCH_SIZE:
            raise ValueError(
                f"max_batch_size must be an integer from the batch size ({self.batch_size}) to {MAX_BATCH_SIZE}; "
                f"got {self.max_batch_size!r}"
            )
        self.bench([1], self.batch_size).validate()  # mode, dtype, attn, device, warmup, repeats

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
    return {budget: found["r"] for budget, found in resolve_budgets(model_name, budgets, **patch_kwargs).items()}


def resolve_budgets(model_name: str, budgets: list[float], **patch_kwargs: object) -> dict[float, dict[str, object]]:
    """Per FLOP budget: ``{"r": the constant r it resolves to, "reached": bool, "warning": str | None}``;
    ``reached`` is False (with the :class:`BudgetWarning` text) when merging saturates above the budget."""
    from vtome.zoo import load_model

    base = load_model(model_name)
    chosen = {}
    for budget in budgets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BudgetWarning)
            r = vtome.settings(vtome.patch(copy.deepcopy(base), flops=budget, **patch_kwargs)).r
        said = [str(w.message) for w in caught if issubclass(w.category, BudgetWarning)]
        for w in caught:  # other warnings go on as they came
            if not issubclass(w.category, BudgetWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        chosen[budget] = {"r": r, "reached": not said, "warning": said[0].removeprefix("vtome: ") if said else None}
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
    """Measure speedup against ``r`` and recommend an ``r``; returns a JSON-able report (see module doc).

    ``recommendation`` is only set when its own measurement met the request: for ``target_speedup``, the
    confirmation run reached the target (else ``confirmation`` holds what it measured); for ``flops``, the
    budget could be reached (else ``budget_warning`` says where merging saturates)."""
    from vtome.bench import check_input_memory, is_out_of_memory

    cfg.validate()
    check_input_memory(cfg.model, [cfg.batch_size], cfg.device, cfg.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        budgets = [cfg.flops] if cfg.flops is not None else list(cfg.ladder)
        resolved = resolve_budgets(cfg.model, budgets, mode=cfg.mode, **cfg.extra)
        chosen = {budget: found["r"] for budget, found in resolved.items()}
        rs = sorted(set(chosen.values()) - {0})
        if not rs:
            raise ValueError(f"no budget in {budgets} makes {cfg.model} merge anything")
        try:
            report = run_benchmark(cfg.bench(rs, cfg.batch_size), on_step)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            raise MemoryError(f"out of memory at --batch-size {cfg.batch_size}; use a smaller one") from None
        curve = sorted((row for row in report["results"] if not row["baseline"]), key=lambda row: row["r"])
        best = max(curve, key=lambda row: row["speedup"])
        recommendation: dict[str, object] | None = None
        confirmation: dict[str, object] | None = None
        budget_warning = None
        if cfg.flops is not None:
            budget_warning = resolved[cfg.flops]["warning"]
            if budget_warning is None:
                recommendation = _summary(curve[0], "flops")
        elif cfg.target_speedup is not None:
            r = _crossing(curve, cfg.target_speedup)
            if r is not None:
                confirm = run_benchmark(cfg.bench([r], cfg.batch_size), on_step)["results"][-1]
                confirmation = {**_summary(confirm, "confirmation"), "met": confirm["speedup"] >= cfg.target_speedup}
                if confirmation["met"]:
                    recommendation = _summary(confirm, "target_speedup")
                report["results"].append(confirm)
        pays = best["speedup"] >= PAYS
        pays_from = None
        stopped = None
        tried: list[dict] = []
        if not pays and best["flop_ratio"] >= PAYS:  # look for the smallest batch size at which merging pays
            batch = cfg.batch_size * 2
            while batch <= cfg.max_batch_size:
                try:
                    check_input_memory(cfg.model, [batch], cfg.device, cfg.dtype)
                    row = run_benchmark(cfg.bench([curve[-1]["r"]], batch), on_step)["results"][-1]
                except (ValueError, RuntimeError) as err:
                    if isinstance(err, RuntimeError) and not is_out_of_memory(err):
                        raise
                    stopped = f"batch size {batch} would not fit in memory" + (
                        "" if is_out_of_memory(err) else f" ({err})"
                    )
                    break
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
        "budget_warning": budget_warning,
        "best": _summary(best, "best"),
        "recommendation": recommendation,
        "confirmation": confirmation,
        "pays": pays,
        "pays_from_batch_size": pays_from,
        "larger_batches": tried,
        "larger_batches_stopped": stopped,
    }


def _summary(row: dict, why: str) -> dict[str, object]:
    keys = ("r", "batch_size", "flop_ratio", "speedup", "clips_per_s", "overhead_share")
    return {"why": why, **{k: row[k] for k in keys}}


def verdict(report: dict[str, object]) -> list[str]:
    """Plain sentences saying what the calibration measured and reached, and what it could not."""
    cfg, best, rec = report["config"], report["best"], report["recommendation"]
    confirmation = report.get("confirmation")
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
    elif cfg["flops"] is not None:
        row = report["best"]
        lines.append(
            f"flops={cfg['flops']} ({1 / cfg['flops']:.3g}x fewer FLOPs) cannot be reached: "
            f"{report['budget_warning']}. "
            f"Measured at that r: {row['flop_ratio']:.2f}x fewer FLOPs, {row['speedup']:.2f}x faster on {where}"
        )
    elif confirmation is not None:
        lines.append(
            f"target {cfg['target_speedup']:.2f}x not met: the measured curve put it at r={confirmation['r']}, but "
            f"a second measurement there gave {confirmation['speedup']:.2f}x on {where}; the best measured is "
            f"{best['speedup']:.2f}x at r={best['r']} ({best['flop_ratio']:.2f}x fewer FLOPs). Timing noise this "
            "close to the target decides it: ask for a target the curve clears, or more --repeats"
        )
    elif cfg["target_speedup"] is not None:
        lines.append(
            f"no r reaches {cfg['target_speedup']:.2f}x on {where}: the best measured is {best['speedup']:.2f}x "
            f"at r={best['r']} ({best['flop_ratio']:.2f}x fewer FLOPs)"
        )
    if not report["pays"]:
        if best["flop_ratio"] < PAYS:
            lines.append(
                f"merging cannot pay on this model: the most it removes is {best['flop_ratio']:.2f}x of the FLOPs "
                f"(r={best['r']}), below the {PAYS:.2f}x a gain would need; larger batches were not tried"
            )
            return lines
        share = best.get("overhead_share")
        lines.append(
            f"merging does not pay on {where}: below {PAYS:.2f}x at every r measured (best {best['speedup']:.2f}x "
            f"at r={best['r']}, which removes {best['flop_ratio']:.2f}x of the FLOPs"
            + (f"; its merge steps took {share:.0%} of the forward" if share is not None else "")
            + ")"
        )
        batch = report["pays_from_batch_size"]
        tried = [row["batch_size"] for row in report["larger_batches"]]
        if batch:
            lines.append(f"it pays from batch size {batch}")
        elif report.get("larger_batches_stopped"):
            upto = f"up to {tried[-1]}" if tried else "beyond the one measured"
            lines.append(
                f"it does not pay at any batch size {upto} either; the search stopped there: "
                f"{report['larger_batches_stopped']} (--max-batch-size {cfg['max_batch_size']})"
            )
        elif tried:
            lines.append(
                f"it does not pay at any batch size up to {tried[-1]} either (doubling up to --max-batch-size "
                f"{cfg['max_batch_size']})"
            )
        else:
            lines.append(f"no larger batch size was tried: --max-batch-size is {cfg['max_batch_size']}")
    return lines

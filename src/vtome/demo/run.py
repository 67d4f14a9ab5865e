"""``vtome demo``: the method end to end, offline, on the bundled models and generated held-out clips.

For every bundled model (``checkpoints.FAMILIES``) the demo measures, on the same held-out clips:

- ``curve``: appearance and temporal accuracy of every reduction mode at several FLOP budgets (``flops``,
  the fraction of the unpatched FLOPs kept; the paper's Figure 3), unpatched as the reference; ``main`` is its
  slice at the main budget;
- ``speed``: measured speedups by the benchmark's interleaved method (:func:`vtome.bench.time_interleaved`:
  the unpatched model and every variant alternate in rotating rounds; medians), for the main table and the
  scheme comparison;
- ``order``: the published A/B order against the spatial order (merge mode);
- ``schemes``: merge and hybrid at two budgets, and for divided space-time models per-frame against
  aligned matching;
- ``placement``: merging in all layers, the first half or the second half, at equal FLOPs.

Accuracy differences between two settings are paired (the same clips), with a ~95% interval of
``2 x`` their standard error, so a reader can tell a real gap from sampling noise.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import vtome
from vtome.adapters import adapter_for
from vtome.demo import checkpoints
from vtome.demo.synth import ClipSpec, is_temporal, make_batch, make_clip, normalize
from vtome.evaluate import _physical_memory
from vtome.flops import BudgetWarning
from vtome.merger import CapWarning

MODES = vtome.MODES
FAMILY_NAMES = {"appearance": "acc_appearance", "temporal": "acc_temporal"}


@dataclass
class DemoConfig:
    """What ``vtome demo`` measures; the defaults are the full run (a few minutes on 2 CPU cores)."""

    clips: int = 450  # held-out clips per model (30 per class)
    # FLOP budgets: the fraction of the unpatched FLOPs kept (vtome.patch(model, flops=...))
    budgets: tuple[float, ...] = (2 / 3, 0.5, 0.4, 1 / 3)  # the curve's budgets (1.5x to 3x fewer FLOPs)
    flops: float = 0.5  # the main table's budget
    second_flops: float = 0.4  # the scheme tables' second budget
    placement_flops: float = 0.8  # budget at which merging placements are compared (every half reaches it)
    threshold: float = 0.8  # hybrid: the paper's VideoMAE value
    batch_size: int = 50
    seed: int = 0  # data seed of the bundled models' held-out split
    timing: bool = True
    time_batch: int = 8
    time_rounds: int = 15
    time_warmup: int = 2
    sections: tuple[str, ...] = ("curve", "order", "schemes", "placement")
    families: tuple[str, ...] | None = None  # default: every bundled model

    def validate(self) -> None:
        """``ValueError`` naming the option for any setting that could not take effect as given."""

        def whole(value: object, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        def budget(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0

        if not whole(self.clips, 15):
            raise ValueError(f"clips must be an integer >= 15 (one clip per class); got {self.clips!r}")
        for name, value in (("flops", self.flops), ("second_flops", self.second_flops)):
            if not budget(value):
                raise ValueError(
                    f"{name} is the fraction of the unpatched FLOPs to keep, in (0, 1) (e.g. 0.5); got {value!r}"
                )
        if not budget(self.placement_flops):
            raise ValueError(f"placement_flops must be in (0, 1); got {self.placement_flops!r}")
        if not self.budgets or not all(budget(f) for f in self.budgets):
            raise ValueError(f"budgets must be fractions in (0, 1); got {self.budgets!r}")
        if isinstance(self.threshold, bool) or not (
            isinstance(self.threshold, (int, float)) and -1.0 <= self.threshold <= 1.0
        ):
            raise ValueError(f"threshold is a cosine similarity, in [-1, 1]; got {self.threshold!r}")
        for name, value, least in (
            ("batch_size", self.batch_size, 1),
            ("time_batch", self.time_batch, 1),
            ("time_rounds", self.time_rounds, 1),
            ("time_warmup", self.time_warmup, 0),
        ):
            if not whole(value, least):
                raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
        unknown = [f for f in self.families or () if f not in checkpoints.FAMILIES]
        if unknown:
            raise ValueError(f"families must be among {', '.join(checkpoints.FAMILIES)}; got {unknown}")

    @classmethod
    def quick(cls) -> DemoConfig:
        """The quick check: fewer clips, reductions and timing rounds; the main table, curve, speed and schemes."""
        return cls(clips=150, budgets=(2 / 3, 0.5, 0.4), time_rounds=7, time_warmup=1, sections=("curve", "schemes"))


@dataclass
class Result:
    """Accuracy of one setting of one model on the held-out clips; ``hits`` ``[clips]`` bool, one per clip."""

    model: str
    setting: dict
    r: object
    flop_ratio: float
    hits: torch.Tensor
    temporal: torch.Tensor  # [clips] bool
    patched: nn.Module | None = field(default=None, repr=False)

    def acc(self, family: str | None = None) -> float:
        hits = self.hits if family is None else self.hits[self.temporal == (family == "temporal")]
        return float(hits.float().mean()) if len(hits) else float("nan")

    def row(self, **extra: object) -> dict:
        """A JSON-ready summary (accuracies in [0, 1]); ``extra`` fields are added."""
        live = vtome.settings(self.patched) if self.setting else None
        return {
            "model": self.model,
            "mode": live.mode if live else "none",
            "order": live.order if live else None,
            "divided": live.divided if live else None,
            "layers": list(live.layers) if live and live.layers is not None else None,
            "r": self.r,
            "flop_ratio": round(self.flop_ratio, 3),
            "acc": self.acc(),
            "acc_appearance": self.acc("appearance"),
            "acc_temporal": self.acc("temporal"),
            "clips": len(self.hits),
            **extra,
        }


def paired_gap(a: Result, b: Result, family: str | None = None) -> tuple[float, float]:
    """Accuracy of ``a`` minus ``b`` on the same clips (of ``family``) and ~95% half-width (2 standard errors)."""
    keep = torch.ones_like(a.hits) if family is None else a.temporal == (family == "temporal")
    d = a.hits[keep].float() - b.hits[keep].float()
    n = len(d)
    if n < 2:
        return float(d.mean()) if n else float("nan"), float("nan")
    return float(d.mean()), 2 * float(d.std()) / n**0.5


class ModelRun:
    """One bundled model, its held-out clips, and a cache of evaluated settings (each setting runs once)."""

    def __init__(self, family: str, cfg: DemoConfig) -> None:
        self.family, self.name, self.cfg = family, checkpoints.FAMILIES[family], cfg
        self.base = checkpoints.load(family)
        spec = ClipSpec(frames=self.base.config.num_frames, size=self.base.config.image_size)
        need = cfg.clips * spec.frames * 3 * spec.size**2 * 4 * 2  # the clips, and their normalised copy
        total = _physical_memory()
        if total and need > total // 2:
            raise ValueError(
                f"--clips {cfg.clips} needs {need / 2**30:.1f} GiB for {self.name}'s generated clips (this machine has "
                f"{total / 2**30:.1f} GiB); use fewer --clips"
            )
        with _threads(1):  # many small tensor ops: extra threads only wait on each other
            clips, labels = make_batch(cfg.seed, "test", range(cfg.clips), spec)
        self.clips, self.labels = normalize(clips), labels
        self.temporal = torch.tensor([is_temporal(y) for y in labels.tolist()])
        self.divided = adapter_for(self.base).layout(self.base).frames is not None
        self._cache: dict[str, Result] = {}

    def patched(self, **setting: object) -> nn.Module:
        """A patched copy of the model (``setting`` goes to :func:`vtome.patch`; empty: unpatched)."""
        if not setting:
            return self.base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            return vtome.patch(copy.deepcopy(self.base), **setting)

    def setting(self, flops: float | None = None, mode: str = "merge", **extra: object) -> dict:
        """Patch arguments for ``mode`` keeping the fraction ``flops`` of the FLOPs (None: unpatched)."""
        if flops is None:
            return {}
        s = {"mode": mode, "flops": flops, **extra}
        if mode == "hybrid":
            s["threshold"] = self.cfg.threshold
        if mode.startswith("random"):
            s["seed"] = 0
        return s

    def result(self, setting: dict) -> Result:
        key = _key(setting)
        if key not in self._cache:
            model = self.patched(**setting)
            hits = []
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", CapWarning)
                for i in range(0, len(self.clips), self.cfg.batch_size):
                    pred = model(pixel_values=self.clips[i : i + self.cfg.batch_size]).logits.argmax(-1)
                    hits.append(pred == self.labels[i : i + self.cfg.batch_size])
            ratio = vtome.last_run(model).flop_ratio if setting else 1.0
            r = vtome.settings(model).r if setting else 0
            self._cache[key] = Result(self.name, dict(setting), r, ratio, torch.cat(hits), self.temporal, model)
        return self._cache[key]

    def sibling(self, model: nn.Module, name: str) -> ModelRun:
        """Another model of the same family (e.g. fine-tuned from this one) on the same held-out clips
        (shared, not generated again), with its own cache of settings."""
        other = copy.copy(self)
        other.base, other.name, other._cache = model, name, {}
        return other

    def speedups(self, settings: list[dict], batch: int | None = None, backward: bool = False) -> dict[str, dict]:
        """Measured speedup of each setting over the unpatched model, all timed interleaved (medians), on
        ``batch`` held-out clips (default ``cfg.time_batch``). ``backward``: time a training step's forward and
        backward (models in training mode, cross-entropy on the clips' labels) instead of an inference forward."""
        from vtome.bench import time_interleaved

        batch = batch or self.cfg.time_batch
        x, labels = self.clips[:batch], self.labels[:batch]
        forwards: dict[str, Callable[[], object]] = {}
        models = {_key(s): self.result(s).patched if s else self.base for s in [{}] + settings}
        for key, model in models.items():

            def forward(model: nn.Module = model) -> object:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CapWarning)
                    if backward:
                        model.zero_grad(set_to_none=True)
                        return model(pixel_values=x, labels=labels).loss.backward()
                    with torch.inference_mode():
                        return model(pixel_values=x)

            forwards[key] = forward
        for model in models.values():
            model.train(backward)
        try:
            times = time_interleaved(forwards, self.cfg.time_warmup, self.cfg.time_rounds)
        finally:
            for model in models.values():
                model.zero_grad(set_to_none=True)
                model.eval()
        base = times[_key({})]
        out = {}
        for key, t in times.items():
            per_round = sorted(b / v for b, v in zip(base, t))  # baseline and variant timed in the same round
            quart = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            out[key] = {
                "latency_ms": statistics.median(t) * 1e3,
                "speedup": statistics.median(base) / statistics.median(t),
                "speedup_iqr": [quart[0], quart[2]],
            }
        return out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _key(setting: dict) -> str:
    return repr(sorted(setting.items()))


def run_demo(cfg: DemoConfig, on_step: Callable[[str], None] | None = None) -> dict:
    """Every section of the demo for every bundled model: ``{section: rows}``, ``reading`` (sentences) and
    ``config``. Sections: ``main``, ``curve``, ``speed``, ``order``, ``schemes``, ``placement``."""
    cfg.validate()
    step = on_step or (lambda _msg: None)
    out: dict[str, list] = {"main": [], "curve": [], "speed": [], "order": [], "schemes": [], "placement": []}
    runs = []
    for family in cfg.families or tuple(checkpoints.FAMILIES):
        step(f"{checkpoints.FAMILIES[family]}: generating {cfg.clips} held-out clips")
        run = ModelRun(family, cfg)
        runs.append(run)
        budgets = _budgets(cfg)
        out["curve"].append(run.result({}).row(flops=1.0))
        for mode in MODES:
            step(f"{run.name}: {mode} at flops {', '.join(f'{f:.2g}' for f in budgets)}")
            out["curve"] += [run.result(run.setting(f, mode)).row(flops=f) for f in budgets]
        main = [{}] + [run.setting(cfg.flops, mode) for mode in MODES]
        schemes = _scheme_settings(run, cfg) if "schemes" in cfg.sections else []
        timed: dict[str, dict] = {}
        if cfg.timing:
            step(f"{run.name}: timing every variant, interleaved")
            extra = [s for s, _ in schemes if _key(s) not in {_key(m) for m in main}]
            timed = run.speedups(main[1:] + extra)
            for s in main + extra:
                out["speed"].append({**run.result(s).row(), **timed[_key(s)], "batch_size": cfg.time_batch})
        out["main"] += [run.result(s).row(flops=cfg.flops if s else 1.0, **_speed(timed, s)) for s in main]
        if "order" in cfg.sections:
            step(f"{run.name}: matching orders")
            for flops in (cfg.flops, cfg.second_flops):
                for order in ("paper", "spatial"):
                    s = run.setting(flops, "merge", **({"order": order} if order != "paper" else {}))
                    out["order"].append(run.result(s).row(flops=flops, order=order))
        for s, flops in schemes:
            out["schemes"].append(run.result(s).row(flops=flops, **_speed(timed, s)))
        if "placement" in cfg.sections:
            step(f"{run.name}: merging placements")
            n = run.base.config.num_hidden_layers
            for label, layers in placement_layers(n).items():
                s = run.setting(cfg.placement_flops, "merge", **({"layers": layers} if layers else {}))
                out["placement"].append(run.result(s).row(flops=cfg.placement_flops, placement=label))
    out["reading"] = reading(runs, cfg)
    out["notes"] = short_of_target(out["main"], cfg.flops) + short_of_target(out["placement"], cfg.placement_flops)
    out["config"] = asdict(cfg)
    return out


def reached(ratio: float, flops: float) -> bool:
    """Whether a FLOP ratio (unpatched / patched) met the budget ``flops`` (fraction kept; rounding aside)."""
    return ratio * flops >= 1 - 1e-3


def short_of_target(rows: list[dict], flops: float) -> list[str]:
    """One sentence per model whose merged rows do not reach the budget ``flops`` (merging saturates)."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        short = [r for r in rows if r["model"] == model and r["mode"] != "none" and not reached(r["flop_ratio"], flops)]
        if short:
            most = max(r["flop_ratio"] for r in short)
            notes.append(
                f"{model}: flops {flops:.2g} ({1 / flops:.3g}x fewer FLOPs) cannot be reached; merging saturates at "
                f"{most:.2f}x fewer ({len(short)} setting(s)), and the tables show what was reached"
            )
    return notes


def reached_title(rows: list[dict], flops: float) -> str:
    """``flops 0.5 (2x fewer FLOPs)`` when every merged row met the budget, else what each model reached."""
    merged = [r for r in rows if r["mode"] != "none"]
    if all(reached(r["flop_ratio"], flops) for r in merged):
        return f"flops {flops:.2g} ({1 / flops:.3g}x fewer FLOPs)"
    per_model = {
        m: min(r["flop_ratio"] for r in merged if r["model"] == m) for m in dict.fromkeys(r["model"] for r in merged)
    }
    return f"flops {flops:.2g} asked ({1 / flops:.3g}x fewer FLOPs), not reached (merging saturates): " + ", ".join(
        f"{m} {v:.2f}x fewer" for m, v in per_model.items()
    )


def placement_layers(num_layers: int) -> dict[str, list[int] | None]:
    """Where to merge: every layer (None), the first half or the second half of ``num_layers``."""
    half = num_layers // 2
    return {"all layers": None, "first half": list(range(half)), "second half": list(range(half, num_layers))}


def _scheme_settings(run: ModelRun, cfg: DemoConfig) -> list[tuple[dict, float]]:
    """Merge and hybrid at the two budgets; per-frame and aligned for a divided space-time model."""
    schemes = ("per_frame", "aligned") if run.divided else (None,)
    return [
        (run.setting(flops, mode, **({"divided": d} if d == "aligned" else {})), flops)
        for flops in (cfg.flops, cfg.second_flops)
        for mode in ("merge", "hybrid")
        for d in schemes
    ]


def _budgets(cfg: DemoConfig) -> list[float]:
    """The curve's budgets and the main table's, largest (least merging) first."""
    return sorted({*cfg.budgets, cfg.flops}, reverse=True)


def _speed(timed: dict, setting: dict) -> dict:
    t = timed.get(_key(setting))
    return {} if t is None else dict(t)


def reading(runs: list[ModelRun], cfg: DemoConfig, tol: float = 0.02) -> list[str]:
    """A few sentences reading the curve: which mode wins at the main budget and by how much (paired,
    ±2 standard errors), how far each mode goes within ``tol`` of unpatched, and joint vs divided."""
    lines = []
    budgets = _budgets(cfg)
    for run in runs:
        none, merge = run.result({}), run.result(run.setting(cfg.flops, "merge"))
        for family in ("temporal", "appearance"):
            others = [
                (mode, *paired_gap(merge, run.result(run.setting(cfg.flops, mode)), family)) for mode in MODES[1:]
            ]
            head = (
                f"{run.name}, {family} classes at {_reached(merge.flop_ratio, cfg.flops)}: merge "
                f"{merge.acc(family):.1%} (unpatched {none.acc(family):.1%})"
            )
            if all(abs(run.result(run.setting(cfg.flops, m)).acc(family) - none.acc(family)) < tol for m in MODES):
                lines.append(f"{head}; every mode within {tol * 100:.0f} points of unpatched.")
                continue
            parts = []
            for mode, gap, ci in sorted(others, key=lambda o: -o[1]):
                if abs(gap) <= ci or gap == 0:
                    parts.append(f"ties with {mode} ({_pts(gap)} ± {ci * 100:.1f})")
                else:
                    parts.append(
                        f"{'beats' if gap > 0 else 'loses to'} {mode} by {abs(gap) * 100:.1f} ± {ci * 100:.1f}"
                    )
            lines.append(f"{head}; merge " + ", ".join(parts) + " pts.")
        held = []
        for mode in MODES:
            ok = [f for f in budgets if _within(run, none, mode, f, tol)]
            reach = ok[-1] if ok and ok == budgets[: len(ok)] else None
            got = run.result(run.setting(reach or budgets[0], mode)).flop_ratio
            where = f"down to {_reached(got, reach)}" if reach else f"not at {_reached(got, budgets[0])}"
            held.append(f"{mode} {where}")
        lines.append(
            f"{run.name} stays within {tol * 100:.0f} points of unpatched on both class families: "
            + ", ".join(held)
            + "."
        )
    if len(runs) > 1:
        losses = []
        for run in runs:
            none, merge = run.result({}), run.result(run.setting(cfg.flops, "merge"))
            losses.append((run.name, merge.acc("temporal") - none.acc("temporal")))
        worst = min(losses, key=lambda x: x[1])
        lines.append(
            f"Temporal classes, merge at flops {cfg.flops:.2g} (or as near as each model gets) vs unpatched: "
            + ", ".join(f"{name} {_pts(loss)}" for name, loss in losses)
            + f"; {worst[0]} loses the most."
        )
    return lines


def _reached(ratio: float, flops: float) -> str:
    """``flops 0.5`` when a FLOP ratio reached the budget ``flops``, else ``3.15x fewer FLOPs (flops 0.001 asked)``."""
    return f"flops {flops:.2g}" if reached(ratio, flops) else f"{ratio:.2f}x fewer FLOPs (flops {flops:.2g} asked)"


def _within(run: ModelRun, none: Result, mode: str, flops: float, tol: float) -> bool:
    res = run.result(run.setting(flops, mode))
    return all(res.acc(f) >= none.acc(f) - tol for f in ("appearance", "temporal"))


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}".replace("-0.0", "+0.0")


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    """PNG of accuracy against FLOP reduction, one panel per model and class family, one line per mode,
    the unpatched accuracy as a dashed reference line (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 2.8 * len(models)), squeeze=False, sharex=True, sharey="row")
    styles = {"merge": "o-", "drop": "s--", "random_merge": "v-", "random_drop": "^--", "hybrid": "D:"}
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        none = next(r for r in mine if r["mode"] == "none")
        for j, (family, key) in enumerate(FAMILY_NAMES.items()):
            ax = axes[i][j]
            ax.axhline(100 * none[key], color="k", ls="--", lw=1, label="unpatched")
            for mode in MODES:
                pts = sorted((r["flop_ratio"], 100 * r[key]) for r in mine if r["mode"] == mode)
                ax.plot([1.0] + [p[0] for p in pts], [100 * none[key]] + [p[1] for p in pts], styles[mode], label=mode)
            ax.set_title(f"{model} · {family} classes", fontsize=9)
            if j == 0:
                ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("FLOP reduction (unpatched / patched FLOPs)")
    axes[0][1].legend(fontsize=7, loc="lower left", ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_visualizations(
    out: str, cfg: DemoConfig, shown_class: str = "moving right", families: Iterable[str] | None = None
) -> list[str]:
    """Merge pictures of the first held-out clip of ``shown_class`` for each bundled model (merge mode at the
    main budget): PNG (frames over their merge groups), GIF and MP4 under ``out``; returns the PNGs."""
    from vtome.data.transforms import preprocess_for
    from vtome.demo.synth import CLASSES, label_of
    from vtome.visualize import clip_from_frames, describe, display_scale, save_visualization, visualize_clip
    from vtome.zoo import model_source

    index = next(i for i in range(10_000) if CLASSES[label_of(cfg.seed, "test", i)] == shown_class)
    written = []
    for family in families or cfg.families or tuple(checkpoints.FAMILIES):
        name = checkpoints.FAMILIES[family]
        model = checkpoints.load(family)
        clip, label = make_clip(cfg.seed, "test", index, ClipSpec(model.config.num_frames, model.config.image_size))
        frames = (clip.permute(0, 2, 3, 1) * 255).round().byte().numpy()
        shown = clip_from_frames(frames, preprocess_for(model, model_source(name)))
        setting = {"flops": cfg.flops}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)
            scale = display_scale(adapter_for(model).token_positions(model)[2])
            drawn, groups = visualize_clip(model, shown, fill="colour", scale=scale, **setting)
            caption = describe(model, name, groups, **setting)
            patched = vtome.patch(copy.deepcopy(model), **setting)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", CapWarning)
            patched(pixel_values=shown.pixel_values)
        got = vtome.last_run(patched).flop_ratio
        caption += f" · {_reached(got, cfg.flops)} · held-out clip {index}: {CLASSES[label]}"
        paths = save_visualization(shown.display, drawn, out, caption, name=f"{name}_merges", fill="colour")
        written.append(str(paths["png"]))
    return written

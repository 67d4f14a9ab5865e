"""``vtome bench``: throughput, latency, memory and FLOPs of a model at several ``r``, measured honestly.

Method: every variant (the unpatched model with its stock attention, and one patched copy per ``r``) is
built once; all get warm-up runs; then timing rounds run each variant once per round, in a rotating
order, so drift and thermal changes hit all of them alike. Timings are wall-clock with the device
synchronised before and after; figures are medians (and 90th percentiles) over the rounds. Peak memory
comes from a separate, untimed run; the share of time spent matching and merging from a separate timing
(:func:`merge_share`).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import vtome
from vtome.adapters.inputs import clip_shape, input_name
from vtome.merger import CapWarning
from vtome.patch import last_run_flops, merger

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    """What to measure; ``rs`` are tokens removed per layer (per frame for divided space-time models)."""

    model: str
    rs: list[int]
    mode: str = "merge"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    device: str = "cpu"
    dtype: str = "fp32"
    attn: str = "sdpa"
    compile: bool = False
    warmup: int = 2
    repeats: int = 5
    threads: int | None = None
    prop_attn: bool | None = None
    start_layer: int = 0
    layers: list[int] | None = None
    order: str = "paper"
    divided: str | None = None  # divided space-time models: per_frame (default) or aligned
    extra: dict = field(default_factory=dict)  # further vtome.patch keyword arguments (threshold, ...)

    def validate(self) -> None:
        """``ValueError`` naming the field that is wrong (the CLI names its flag instead)."""
        if not self.rs:
            raise ValueError("rs needs at least one value, e.g. 0,50,100")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in self.rs):
            raise ValueError(f"rs values must be ints >= 0; got {self.rs}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes values must be ints >= 1; got {self.batch_sizes}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.attn not in ("sdpa", "eager"):
            raise ValueError(f"attn must be sdpa or eager; got {self.attn!r}")
        check_device(self.device)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0; got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1; got {self.repeats}")
        if self.mode not in vtome.MODES:
            raise ValueError(f"mode must be one of {', '.join(vtome.MODES)}; got {self.mode!r}")

    def patch_kwargs(self) -> dict[str, object]:
        """The :func:`vtome.patch` keyword arguments of every patched variant, ``r`` aside."""
        return {
            "mode": self.mode,
            "prop_attn": self.prop_attn,
            "seed": 0,
            "start_layer": self.start_layer,
            "layers": self.layers,
            "order": self.order,
            "divided": self.divided,
            **self.extra,
        }


def check_device(device: str) -> None:
    """``ValueError`` unless ``device`` is ``cpu``, or ``cuda``/``cuda:N`` with a GPU present."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use cpu")


def check_input_memory(model: str, batch_sizes: list[int], device: str, dtype: str) -> None:
    """``ValueError`` when the input clips of the largest batch alone (and their copy) would take more than half
    of ``device``'s memory: refused before anything is loaded, instead of dying out of memory. Models whose
    config cannot be read without loading them are not checked."""
    from vtome.zoo import load_config

    config = load_config(model)
    if config is None:
        return
    from vtome.adapters.inputs import clip_shape

    frames, channels, size = clip_shape(config)
    per_clip = frames * channels * size * size * DTYPES[dtype].itemsize
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        from vtome.evaluate import _physical_memory

        total = _physical_memory()
    need = max(batch_sizes) * per_clip * 2
    if total and need > total // 2:
        raise ValueError(
            f"--batch-size {max(batch_sizes)} needs at least {need / 2**30:.1f} GiB for its input clips alone "
            f"({device} has {total / 2**30:.1f} GiB); use smaller batch sizes"
        )


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch running out of memory (CUDA, or a failed CPU allocation)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def machine_info(device: str) -> dict[str, object]:
    """The machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_reader() -> Callable[[], int] | None:
    """Bytes currently allocated by glibc malloc (all arenas plus mmapped blocks), or None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def read() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return read


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call adds: CUDA max allocated, or on CPU the peak of allocated heap bytes sampled
    every ~0.2 ms (a model forward lasts far longer; a buffer held for less may go unseen)."""
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    read = _heap_reader()
    if read is None:
        return None
    start = read()
    peak, ready, done = [start], threading.Event(), threading.Event()

    def sample() -> None:
        ready.set()
        while not done.is_set():
            peak[0] = max(peak[0], read())
            time.sleep(0.0002)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the sampler run between short ops too
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ready.wait()  # a call shorter than the sampler's start-up would otherwise go unseen
    try:
        fn()
    finally:
        done.set()
        sampler.join()
        sys.setswitchinterval(interval)
    return (peak[0] - start) / 2**20


def merge_share(model: nn.Module, forward: Callable[[], object], device: str, repeats: int = 5) -> float:
    """Share of a patched ``model``'s forward time spent in its merge steps (metric, matching, merging).

    Measured without a profiler: one forward records what every merge step (``Merger.merge``) returns; then
    the forward is timed as it is and with each merge step answered from that record (every layer gets the
    same tokens, so everything else does the same work), interleaved over ``repeats`` rounds. The share is
    ``1 - median(answered / as it is)`` over the rounds (each ratio from two adjacent forwards, so slow drifts
    of the machine cancel), at least 0. What runs once per forward outside the steps (the final index map,
    proportional-attention masks) counts as model time. The record holds every layer's merged tokens until the
    measurement ends.
    """
    steps = merger(model)
    real = steps.merge
    own = vars(steps).get("merge")  # someone's own instrumentation, put back afterwards
    record: list[object] = []

    def recording(*args: object, **kwargs: object) -> object:
        record.append(real(*args, **kwargs))
        return record[-1]

    def with_step(step: Callable[..., object]) -> object:
        steps.merge = step  # an instance attribute shadows the method the patched layers call
        try:
            return forward()
        finally:
            if own is not None:
                steps.merge = own
            else:
                del steps.merge

    def answered() -> object:
        replies = iter(record)
        return with_step(lambda *args, **kwargs: next(replies))

    with_step(recording)
    times = time_interleaved({"as is": forward, "answered": answered}, warmup=1, repeats=repeats, device=device)
    ratios = [answered / as_is for answered, as_is in zip(times["answered"], times["as is"])]  # paired by round
    return max(0.0, 1.0 - statistics.median(ratios))


@dataclass
class _Variant:
    r: int
    model: nn.Module
    forward: Callable[[torch.Tensor], object]
    latencies: list[float] = field(default_factory=list)


def run_benchmark(cfg: BenchConfig, on_step: Callable[[str], None] | None = None) -> dict[str, object]:
    """Measure ``cfg``; returns ``{"machine", "config", "results"}`` with one result per (r, batch size).

    ``on_step`` is called with a short label after every timed or warm-up forward (for progress bars).
    """
    cfg.validate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)  # capped layers show in tokens_per_layer
        return _run(cfg, on_step)


def _run(cfg: BenchConfig, on_step: Callable[[str], None] | None) -> dict[str, object]:
    from vtome.zoo import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = cfg.device, DTYPES[cfg.dtype]
    base = load_model(cfg.model, attn=cfg.attn).to(device=device, dtype=dtype)
    frames, channels, size = clip_shape(base)

    variants = [_Variant(0, base, _forward_fn(base, cfg.compile))]
    for r in sorted({r for r in cfg.rs if r > 0}):
        model = vtome.patch(copy.deepcopy(base), r=r, **cfg.patch_kwargs())
        variants.append(_Variant(r, model, _forward_fn(model, cfg.compile)))
    step = on_step or (lambda _label: None)
    results = []
    for batch in cfg.batch_sizes:
        x = torch.randn(batch, frames, channels, size, size, generator=None)
        x = x.to(device=device, dtype=dtype)
        tokens, flop_counts = {}, {}
        for v in variants:
            v.latencies = []
            counted = v.model if v.r > 0 else vtome.patch(copy.deepcopy(base), r=0)
            _forward_fn(counted, False)(x)  # records the token counts
            tokens[v.r] = list(vtome.last_run(counted).tokens_per_layer)
            flop_counts[v.r] = last_run_flops(counted)
            v.forward(x)  # first call: compiles if asked
            for _ in range(cfg.warmup):
                v.forward(x)
                step(f"warm-up r={v.r} b={batch}")
        for round_ in range(cfg.repeats):
            shift = round_ % len(variants)
            for v in variants[shift:] + variants[:shift]:
                _sync(device)
                start = time.perf_counter()
                v.forward(x)
                _sync(device)
                v.latencies.append(time.perf_counter() - start)
                step(f"timing r={v.r} b={batch}")
        base_median = statistics.median(variants[0].latencies)
        for v in variants:
            unmerged, flops = flop_counts[v.r]
            median = statistics.median(v.latencies)
            speedup = base_median / median
            flop_ratio = unmerged / flops
            results.append(
                {
                    "model": cfg.model,
                    "mode": cfg.mode,
                    "r": v.r,
                    "baseline": v.r == 0,
                    "batch_size": batch,
                    "clips_per_s": batch / median,
                    "frames_per_s": batch * frames / median,
                    "latency_ms_median": median * 1e3,
                    "latency_ms_p90": _percentile(v.latencies, 0.9) * 1e3,
                    "peak_mem_mb": peak_memory_mb(functools.partial(v.forward, x), device),
                    "gflops": flops / 1e9,
                    "flop_ratio": flop_ratio,
                    "speedup": speedup,
                    "speedup_over_flop_ratio": speedup / flop_ratio,
                    "overhead_share": _share(v, x, cfg),
                    "tokens_per_layer": tokens[v.r],
                    "repeats": len(v.latencies),
                }
            )
    return {"machine": machine_info(device), "config": {**cfg.__dict__}, "results": results}


def _share(v: _Variant, x: torch.Tensor, cfg: BenchConfig) -> float | None:
    """The merge step's share of ``v``'s forward (None for a compiled model: its merge is fused away)."""
    if v.r == 0:
        return 0.0
    if cfg.compile:
        return None
    return merge_share(v.model, functools.partial(v.forward, x), cfg.device, max(cfg.repeats, 5))


def _forward_fn(model: nn.Module, compile_model: bool) -> Callable[[torch.Tensor], object]:
    target = torch.compile(model) if compile_model else model
    name = input_name(model)

    def forward(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return target(**{name: x})

    return forward


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def total_forwards(cfg: BenchConfig) -> int:
    """Number of warm-up and timed forwards :func:`run_benchmark` reports through ``on_step``."""
    variants = 1 + len({r for r in cfg.rs if r > 0})
    return len(cfg.batch_sizes) * variants * (cfg.warmup + cfg.repeats)


def plot_speedup(report: dict[str, object], path: str) -> None:
    """PNG of measured speedup vs r, one line per batch size, with the FLOP-ratio bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({row["batch_size"] for row in results}):
        rows = sorted((row for row in results if row["batch_size"] == batch), key=lambda row: row["r"])
        ax.plot([x["r"] for x in rows], [x["speedup"] for x in rows], "o-", label=f"measured, batch {batch}")
    rows = sorted({row["r"]: row for row in results}.values(), key=lambda row: row["r"])
    ax.plot([x["r"] for x in rows], [x["flop_ratio"] for x in rows], "k--", label="FLOP ratio (upper bound)")
    machine = report["machine"]
    where = machine["gpu"] or f"{machine['cpu']} ({machine['threads']} threads)"
    ax.set_xlabel("r (tokens merged per layer)")
    ax.set_ylabel("speedup vs unpatched (SDPA)")
    ax.set_title(f"{results[0]['model']} · {report['config']['dtype']} · {where}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_interleaved(
    forwards: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 5, device: str = "cpu"
) -> dict[str, list[float]]:
    """Wall-clock seconds of each call in ``forwards`` ``{name: fn}``, by the benchmark's method: every call
    is warmed up, then each round runs all of them once, starting one further along each round, so that
    background load and drift land on all of them alike. Take medians of the returned lists."""
    names = list(forwards)
    for name in names:
        for _ in range(warmup):
            forwards[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            forwards[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


# -- the GPU suite: every base-size family, batch 1/8/32, bf16, eager and compiled, SDPA backends ----------

SUITES: dict[str, tuple[str, ...]] = {
    "gpu": ("videomae-base", "vivit-base", "timesformer-base", "motionformer-base"),
}
BACKENDS = ("default", "math", "efficient", "flash", "cudnn")


@dataclass
class SuiteConfig:
    """What :func:`run_suite` measures: each of ``models`` unpatched and patched to keep ``flops`` of its
    FLOPs, at each batch size, eager under each SDPA backend (``default``: PyTorch's own choice) and
    compiled (``torch.compile(fullgraph=True)``, default backend). ``budget_s`` bounds the wall time: work
    that would not fit (judged from the slowest compiled item so far, ``compile_guess_s`` before the first)
    is listed as skipped, never run half."""

    models: tuple[str, ...] = SUITES["gpu"]
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    device: str = "cuda"
    dtype: str = "bf16"
    flops: float = 0.5
    backends: tuple[str, ...] = BACKENDS
    compile: bool = True
    compile_backend: str = "inductor"  # "eager" traces the whole graph without generating code (tests)
    warmup: int = 3
    repeats: int = 10
    budget_s: float = 450.0
    compile_guess_s: float = 60.0

    def validate(self) -> None:
        if not self.models:
            raise ValueError("models needs at least one model name")
        if not self.batch_sizes or any(
            not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.batch_sizes
        ):
            raise ValueError(f"batch_sizes values must be ints >= 1; got {self.batch_sizes}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        check_device(self.device)
        if not 0.0 < self.flops < 1.0:
            raise ValueError(f"flops is the fraction of the unpatched FLOPs to keep, in (0, 1); got {self.flops}")
        if any(b not in BACKENDS for b in self.backends) or "default" not in self.backends:
            raise ValueError(f"backends must include default and come from {', '.join(BACKENDS)}; got {self.backends}")
        if self.warmup < 1 or self.repeats < 1:
            raise ValueError(f"warmup and repeats must be >= 1; got {self.warmup}, {self.repeats}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0; got {self.budget_s}")


def _backend_context(name: str) -> object:
    """A context manager that restricts SDPA to backend ``name`` (``default``: no restriction)."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "math": SDPBackend.MATH,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    return sdpa_kernel([kinds[name]])


def _suite_forward(model: nn.Module, backend: str, x: torch.Tensor) -> Callable[[], object]:
    name = input_name(model)

    def forward() -> object:
        with torch.inference_mode(), _backend_context(backend):
            return model(**{name: x})

    return forward


def _calls_sdpa(forward: Callable[[], object]) -> bool:
    """Whether one call of ``forward`` reaches ``scaled_dot_product_attention`` (TimeSformer's does not)."""
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen: list[bool] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is sdpa:
                seen.append(True)
            return func(*args, **(kwargs or {}))

    with Watch():
        forward()
    return bool(seen)


def _failure(err: BaseException) -> str:
    """A one-line reason for a variant that could not run (kept in the report instead of stopping the suite)."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory"
    if "no available kernel" in text.lower() or "no viable backend" in text.lower():
        return "unavailable (this backend does not run this attention: shape, dtype, mask or device)"
    first = (text.strip().splitlines() or [""])[0]
    return f"failed: {type(err).__name__}: {first[:200]}"


def run_suite(cfg: SuiteConfig, on_step: Callable[[str], None] | None = None) -> dict[str, object]:
    """Measure ``cfg``; returns ``{"machine", "config", "results", "skipped", "wall_s"}``.

    One result per (model, batch size, compiled, backend): the unpatched and the patched model, each run
    once (``*_first_call_s``: for a compiled model, its compilation), then timed by
    :func:`time_interleaved` (``warmup`` forwards, ``repeats`` rounds); medians in ms, ``speedup`` =
    unpatched / patched median, ``flop_ratio`` = unpatched / patched FLOPs, ``status`` ``ok`` or why a
    variant did not run. Eager work runs first, compiled work after it while it fits in ``budget_s``.
    """
    from vtome.zoo import load_model

    cfg.validate()
    step = on_step or (lambda _label: None)
    started = time.perf_counter()
    device, dtype = cfg.device, DTYPES[cfg.dtype]
    results: list[dict[str, object]] = []
    skipped: list[dict[str, object]] = []

    def free() -> None:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    def measure(name: str, batch: int, compiled: bool, backend: str, info: dict, forwards: dict) -> None:
        row: dict[str, object] = {
            "model": name,
            "batch_size": batch,
            "compiled": compiled,
            "backend": backend,
            "r": info["r"],
            "flops": cfg.flops,
            "flop_ratio": info["flop_ratio"],
            "speedup": None,
        }
        reasons, runnable = [], {}
        for key, forward in forwards.items():
            row[f"{key}_ms"] = row[f"{key}_clips_per_s"] = row[f"{key}_first_call_s"] = None
            try:
                _sync(device)
                begin = time.perf_counter()
                forward()
                _sync(device)
                row[f"{key}_first_call_s"] = time.perf_counter() - begin
                runnable[key] = forward
            except Exception as err:  # a backend that cannot run this attention, memory, a failed compile
                reasons.append(f"{key}: {_failure(err)}")
                free()
        if runnable:
            try:
                times = time_interleaved(runnable, cfg.warmup, cfg.repeats, device)
            except Exception as err:
                reasons.append(_failure(err))
                times = {}
                free()
            for key, values in times.items():
                median = statistics.median(values)
                row[f"{key}_ms"], row[f"{key}_clips_per_s"] = median * 1e3, batch / median
            if row["unpatched_ms"] and row["patched_ms"]:
                row["speedup"] = row["unpatched_ms"] / row["patched_ms"]
        row["status"] = "; ".join(reasons) or "ok"
        results.append(row)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        families: dict[str, tuple[nn.Module, nn.Module, dict]] = {}
        for name in cfg.models:
            base = load_model(name, attn="sdpa").to(device=device, dtype=dtype).eval()
            merged = vtome.patch(copy.deepcopy(base), flops=cfg.flops, seed=0)
            frames, channels, size = clip_shape(base)
            probe = torch.randn(1, frames, channels, size, size, device=device, dtype=dtype)
            _suite_forward(merged, "default", probe)()
            unmerged_flops, merged_flops = last_run_flops(merged)
            info = {"r": vtome.settings(merged).r, "flop_ratio": unmerged_flops / merged_flops}
            backends = cfg.backends if _calls_sdpa(_suite_forward(base, "default", probe)) else ("default",)
            for batch in cfg.batch_sizes:
                x = torch.randn(batch, frames, channels, size, size, device=device, dtype=dtype)
                for backend in backends:
                    step(f"{name} batch {batch} eager {backend}")
                    variants = {"unpatched": base, "patched": merged}
                    forwards = {key: _suite_forward(model, backend, x) for key, model in variants.items()}
                    measure(name, batch, False, backend, info, forwards)
            families[name] = (base.cpu(), merged.cpu(), info)  # the device holds one family at a time
            free()
        compile_cost: list[float] = []
        for name in cfg.models if cfg.compile else ():
            base, merged, info = families[name]
            base, merged = base.to(device), merged.to(device)
            frames, channels, size = clip_shape(base)
            for batch in cfg.batch_sizes:
                expected = max(compile_cost, default=cfg.compile_guess_s)
                if time.perf_counter() - started + expected > cfg.budget_s:
                    skipped.append({"model": name, "batch_size": batch, "compiled": True, "reason": "time budget"})
                    continue
                begin = time.perf_counter()
                step(f"{name} batch {batch} compiled")
                torch._dynamo.reset()  # a fresh cache per item: no recompile limit is reached across items
                x = torch.randn(batch, frames, channels, size, size, device=device, dtype=dtype)
                forwards = {
                    key: _suite_forward(torch.compile(model, fullgraph=True, backend=cfg.compile_backend), "default", x)
                    for key, model in (("unpatched", base), ("patched", merged))
                }
                measure(name, batch, True, "default", info, forwards)
                compile_cost.append(time.perf_counter() - begin)
            base.cpu()
            merged.cpu()
            free()
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.__dict__.items()}
    return {
        "machine": machine_info(device),
        "config": config,
        "results": results,
        "skipped": skipped,
        "wall_s": time.perf_counter() - started,
    }

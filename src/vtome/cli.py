"""The ``vtome`` command line: ``bench``, ``calibrate``, ``demo``, ``eval``, ``sweep``, ``visualize`` and analyses."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from collections.abc import Sequence


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, latency, memory and FLOPs at several r",
        description="Measure a model unpatched and patched at each r, interleaved in one process.",
    )
    p.add_argument("--model", required=True, help="built-in name (e.g. videomae-base), local directory or hub id")
    p.add_argument(
        "--r",
        type=_ints,
        default=[0, 50, 100, 150],
        help="comma-separated r values (per frame for "
        "divided space-time models); r=0 is the unpatched baseline (default: 0,50,100,150)",
    )
    p.add_argument("--mode", default="merge", help="merge, drop, random_merge, random_drop or hybrid")
    p.add_argument("--batch-size", type=_ints, default=[1], help="comma-separated batch sizes (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--attn", default="sdpa", help="attention backend of the baseline and the patched models")
    p.add_argument("--prop-attn", default=None, choices=["on", "off"], help="override the family default")
    p.add_argument("--start-layer", type=int, default=0, help="merge only from this layer on")
    p.add_argument("--layers", type=_ints, default=None, help="merge only in these layers (comma-separated)")
    p.add_argument("--order", default="paper", choices=["paper", "spatial"], help="token order (default: paper)")
    p.add_argument(
        "--divided", default=None, choices=["per_frame", "aligned"], help="divided space-time models: matching scheme"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--warmup", type=int, default=2, help="warm-up forwards per variant (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of speedup vs r with the FLOP bound")
    p.set_defaults(func=_bench)


def check_output_file(path: str, flag: str) -> None:
    """``ValueError`` unless ``path`` can be written as a file (tried before any long work; nothing is
    truncated, and a file created for the try is removed)."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: folder {parent} does not exist; create it or choose another path")
    existed = os.path.exists(target)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_APPEND | (0 if existed else os.O_CREAT | os.O_EXCL)))
        if not existed:
            os.unlink(target)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write there ({err.strerror or err}); choose another path") from None


def _check_bench_options(args: argparse.Namespace, cfg: object) -> None:
    """Options ``BenchConfig.validate`` leaves to the run, checked before loading anything."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1 (torch CPU threads); got {args.threads}")
    if args.start_layer < 0:
        raise ValueError(f"--start-layer must be >= 0; got {args.start_layer}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag)
    from vtome.bench import check_input_memory

    check_input_memory(cfg.model, cfg.batch_sizes, cfg.device, cfg.dtype)


def _bench(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from vtome.bench import BenchConfig, plot_speedup, run_benchmark, total_forwards

    cfg = BenchConfig(
        model=args.model,
        rs=args.r,
        mode=args.mode,
        batch_sizes=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        compile=args.compile,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        prop_attn=None if args.prop_attn is None else args.prop_attn == "on",
        start_layer=args.start_layer,
        layers=args.layers,
        order=args.order,
        divided=args.divided,
    )
    cfg.validate()
    _check_bench_options(args, cfg)
    transformers.utils.logging.disable_progress_bar()
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]bench[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("loading", total=total_forwards(cfg))
        try:
            report = run_benchmark(cfg, on_step=lambda label: progress.update(task, advance=1, description=label))
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err):
                raise MemoryError(
                    f"out of memory at --batch-size {','.join(map(str, cfg.batch_sizes))}; use smaller batch sizes"
                ) from None
            raise
    m = report["machine"]
    out = Console(width=None if Console().is_terminal else 160)
    out.print(
        f"[bold]{args.model}[/] · {cfg.dtype} · attn {cfg.attn} · mode {cfg.mode} · device {m['device']}"
        f" ({m['gpu'] or m['cpu']}) · torch {m['torch']} · {m['threads']} threads"
    )
    table = Table()
    for col in (
        "r",
        "batch",
        "clips/s",
        "frames/s",
        "p50 ms",
        "p90 ms",
        "peak MB",
        "GFLOPs",
        "FLOP ratio",
        "speedup",
        "of bound",
        "merge time",
    ):
        table.add_column(col, justify="right")
    for row in report["results"]:
        mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
        table.add_row(
            "baseline" if row["baseline"] else str(row["r"]),
            str(row["batch_size"]),
            f"{row['clips_per_s']:.2f}",
            f"{row['frames_per_s']:.1f}",
            f"{row['latency_ms_median']:.1f}",
            f"{row['latency_ms_p90']:.1f}",
            mem,
            f"{row['gflops']:.1f}",
            f"{row['flop_ratio']:.2f}x",
            f"{row['speedup']:.2f}x",
            f"{row['speedup_over_flop_ratio']:.0%}",
            "-" if row["overhead_share"] is None else f"{row['overhead_share']:.1%}",
        )
    out.print(table)
    out.print(
        "GFLOPs per clip, transformer layers only (plus the attentive pooler for V-JEPA 2); "
        "'of bound' = speedup / FLOP ratio; 'merge time' = share of the forward spent matching and merging "
        "(the forward timed as is and with its merge steps answered from a recording, interleaved)."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        out.print(f"wrote {args.json}")
    if args.plot:
        plot_speedup(report, args.plot)
        out.print(f"wrote {args.plot}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="the r that gives a speedup (or FLOP budget) on this device and batch size",
        description="Measure speedup against r on this device (interleaved with the unpatched model), fit "
        "where it meets --target-speedup (or measure --flops), and say plainly when merging does not pay.",
    )
    p.add_argument("--model", required=True, help="built-in name, local directory, Motionformer .pyth or hub id")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-speedup", type=float, help="wanted speedup, e.g. 2 (fits r on the measured curve)")
    target.add_argument("--flops", type=float, help="fraction of the FLOPs to keep, e.g. 0.5 (measures that r)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size to calibrate for (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--attn", default="sdpa", help="attention backend (default sdpa, the fastest stock one)")
    p.add_argument("--mode", default="merge", help="merge, drop, random_merge, random_drop or hybrid")
    p.add_argument("--warmup", type=int, default=2, help="warm-up forwards per variant (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-batch-size", type=int, default=64, help="largest batch tried when merging does not pay")
    p.add_argument("--json", metavar="FILE", help="write the measurements and the recommendation as JSON")
    p.set_defaults(func=_calibrate)


def _check_writable(path: str | None, option: str) -> None:
    """Fail before any work when ``path`` cannot be written (a missing folder, a folder, no permission)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: cannot write a file there (is the folder missing, or is it a folder?)")


def _calibrate(args: argparse.Namespace) -> int:
    import transformers
    from rich.console import Console
    from rich.table import Table

    from vtome.calibrate import CalibrateConfig, calibrate, verdict

    _check_writable(args.json, "--json")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    cfg = CalibrateConfig(
        model=args.model,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        mode=args.mode,
        target_speedup=args.target_speedup,
        flops=args.flops,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
    )
    cfg.validate()
    transformers.utils.logging.disable_progress_bar()
    console = Console(stderr=True)
    with console.status("[bold]calibrate[/] measuring"):
        report = calibrate(cfg)
    m = report["machine"]
    out = Console(width=None if Console().is_terminal else 160)
    out.print(
        f"[bold]{args.model}[/] · {cfg.dtype} · attn {cfg.attn} · mode {cfg.mode} · device {m['device']}"
        f" ({m['gpu'] or m['cpu']}) · {m['threads']} threads · batch {cfg.batch_size}"
    )
    table = Table()
    for col in ("r", "batch", "FLOP ratio", "speedup", "clips/s", "merge time"):
        table.add_column(col, justify="right")
    for row in report["results"]:
        table.add_row(
            "baseline" if row["baseline"] else str(row["r"]),
            str(row["batch_size"]),
            f"{row['flop_ratio']:.2f}x",
            f"{row['speedup']:.2f}x",
            f"{row['clips_per_s']:.2f}",
            "-" if row["overhead_share"] is None else f"{row['overhead_share']:.1%}",
        )
    out.print(table)
    for line in verdict(report):
        out.print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        out.print(f"wrote {args.json}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline demo: bundled models on generated clips, every mode, accuracy vs FLOPs, measured speed",
        description="Accuracy (appearance and temporal classes) of the bundled demo models, unpatched and in "
        "every reduction mode at several FLOP reductions, on generated held-out clips; measured speedups "
        "(interleaved timing); matching orders, schemes and placements; a curve PNG and merge pictures.",
    )
    p.add_argument(
        "--quick", action="store_true", help="150 clips per model; fewer reductions, timing rounds and sections"
    )
    p.add_argument("--clips", type=int, default=None, help="held-out clips per model (default 450; --quick 150)")
    p.add_argument("--flop-ratio", type=float, default=2.0, help="FLOP reduction of the main table (default 2.0)")
    p.add_argument("--threshold", type=float, default=0.8, help="hybrid threshold (default 0.8, the paper's VideoMAE)")
    p.add_argument("--no-timing", action="store_true", help="skip the speed measurement")
    p.add_argument("--json", metavar="FILE", help="write every section as JSON")
    p.add_argument("--out", metavar="DIR", default="demo_out", help="where the curve and merge pictures go")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from rich.console import Console

    from vtome.demo.report import print_report
    from vtome.demo.run import DemoConfig, plot_curves, run_demo, write_visualizations

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    clips = cfg.clips if args.clips is None else args.clips
    cfg = dataclasses.replace(
        cfg, clips=clips, target=args.flop_ratio, threshold=args.threshold, timing=not args.no_timing
    )
    cfg.validate()
    if args.json:
        check_output_file(args.json, "--json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder; choose a folder name")
    out = Console(width=None if Console().is_terminal else 140)
    ratios = ", ".join(f"{r:g}x" for r in cfg.ratios)
    out.print(
        f"[bold]vtome demo[/]: {cfg.clips} generated held-out clips per model (appearance classes: what the object "
        f"is; temporal classes: how it moves); every mode at {ratios} fewer FLOPs"
    )
    with out.status("running") as status:
        report = run_demo(cfg, on_step=lambda msg: status.update(msg))
    print_report(report, cfg, out)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    curve = folder / "accuracy_vs_flops.png"
    plot_curves(report["curve"], str(curve), f"{cfg.clips} held-out clips per model")
    out.print(f"accuracy vs FLOPs (every model and mode, unpatched as the dashed line): {curve}")
    pictures = write_visualizations(str(folder), cfg)
    out.print("merge groups of one held-out clip (PNG: frames over their groups; GIF, MP4): " + ", ".join(pictures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        out.print(f"wrote {args.json}")
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name, local directory or hub id")
    p.add_argument("--dataset", required=True, choices=["k400", "ssv2", "epic", "folder"])
    p.add_argument("--root", required=True, help="dataset root directory")
    p.add_argument("--split", help="k400: list file; ssv2: validation.json; epic: annotation CSV")
    p.add_argument("--labels", help="class names (k400: one per line or JSON; ssv2: labels.json)")
    p.add_argument("--mode", default="merge", help="merge, drop, random_merge, random_drop or hybrid")
    p.add_argument("--threshold", type=float, default=0.0, help="hybrid threshold (cosine similarity)")
    p.add_argument("--prop-attn", default=None, choices=["on", "off"], help="override the family default")
    p.add_argument("--views", default="1x1", help="temporal clips x spatial crops, scores averaged (default 1x1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--sampling", choices=["dense", "segment"], help="frame sampling (default: per dataset)")
    p.add_argument("--sampling-rate", type=int, help="dense sampling stride (default 64 // frames)")
    p.add_argument("--noun-model", help="EPIC-KITCHENS: a second model for nouns")
    p.add_argument("--verb-classes", type=int, help="EPIC-KITCHENS: one model, first N logits are verbs")
    p.add_argument("--limit", type=int, help="first N videos only")
    p.add_argument("--order", default=None, choices=["paper", "spatial"], help="matching order (default: paper)")
    p.add_argument(
        "--divided", default=None, choices=["per_frame", "aligned"], help="divided space-time models: matching scheme"
    )


def _eval_config(args: argparse.Namespace, **overrides: object) -> object:
    from vtome.evaluate import EvalConfig

    return EvalConfig(
        model=args.model,
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        split=args.split,
        labels=args.labels,
        mode=args.mode,
        threshold=args.threshold,
        prop_attn=None if args.prop_attn is None else args.prop_attn == "on",
        views=args.views,
        batch_size=args.batch_size,
        workers=args.workers,
        sampling=args.sampling,
        sampling_rate=args.sampling_rate,
        noun_model=args.noun_model,
        verb_classes=args.verb_classes,
        limit=args.limit,
        extra={k: v for k, v in (("order", args.order), ("divided", args.divided)) if v is not None},
        **overrides,
    )


def _eval_progress(progress: object, label: str) -> object:
    task = progress.add_task(label, total=None, acc="")

    def update(done: int, total: int, acc: float | None) -> None:
        progress.update(task, completed=done, total=total, acc="" if acc is None else f"top-1 {acc:.1%}")

    return update


def _progress() -> object:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[acc]}"),
        console=Console(stderr=True),
        transient=True,
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy of a model (merged or not) on a video dataset",
        description="Top-1/top-5, per-class accuracy and confusion matrix (EPIC: verb, noun and "
        "action), written as it goes; a re-run with the same --out resumes.",
    )
    _add_eval_args(p)
    p.add_argument("--r", type=int, default=0, help="tokens merged per layer (0: unpatched)")
    p.add_argument("--start-layer", type=int, default=0, help="merge only from this layer on")
    p.add_argument("--layers", type=_ints, default=None, help="merge only in these layers (comma-separated)")
    p.add_argument("--out", default="results", help="results folder (predictions.jsonl, summary.json)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from vtome.evaluate import check_merge_options, run_eval

    cfg = _eval_config(args, r=args.r, start_layer=args.start_layer, layers=args.layers)
    check_merge_options(cfg)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        with _progress() as progress:
            summary = run_eval(cfg, _eval_progress(progress, "eval"))
    else:
        summary = run_eval(cfg)
    if rank0:
        keys = [k for k in ("top1", "top5", "verb_top1", "noun_top1", "action_top1") if k in summary]
        figures = ", ".join(f"{k} {summary[k]:.2%}" for k in keys)
        speed = summary["clips_per_s"]
        print(
            f"{summary['num_evaluated']} videos ({summary['num_failed']} failed): {figures}; "
            f"{'-' if speed is None else f'{speed:.2f}'} clips/s; results in {cfg.out}/"
        )
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="accuracy vs speedup over r values and modes (CSV and PNG)",
        description="One resumable evaluation per setting, the unpatched baseline included; writes "
        "OUT/sweep.csv and OUT/sweep.png (accuracy against speedup).",
    )
    _add_eval_args(p)
    p.add_argument("--r", type=_ints, default=[0, 50, 100, 150], help="comma-separated r values")
    p.add_argument("--modes", default="merge", help="comma-separated modes (default: merge)")
    p.add_argument("--start-layers", type=_ints, default=[0], help="comma-separated first merging layers")
    p.add_argument("--layers", type=_ints, default=None, help="merge only in these layers (comma-separated)")
    p.add_argument(
        "--placements",
        action="store_true",
        help="compare merging layer sets (all, halves, thirds) at "
        "equal total token reduction: r per layer over all layers, concentrated in each set",
    )
    p.add_argument("--out", default="sweep", help="sweep folder")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from vtome.evaluate import check_merge_options
    from vtome.sweep import run_sweep, sweep_grid

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("merge", "drop", "random_merge", "random_drop", "hybrid")]
    if any(r < 0 for r in args.r):
        raise ValueError(f"--r values must be >= 0 (0 is the unpatched baseline); got {args.r}")
    if bad or not modes or not args.r:
        raise ValueError(
            f"--modes must list merge, drop, random_merge, random_drop or hybrid and --r at least one "
            f"value; got modes {args.modes!r}, r {args.r}"
        )
    check_merge_options(_eval_config(args), modes)
    grid = sweep_grid(args.model, args.r, modes, args.start_layers, args.layers, args.placements)
    with _progress() as progress:
        update = _eval_progress(progress, "sweep")
        rows = run_sweep(_eval_config(args), grid, eval_progress=update)
    for row in rows:
        speed = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        where = row["placement"] or f"from layer {row['start_layer']}"
        print(
            f"{row['mode']:>12} r={row['r']:<4} {where}: top-1 {row['top1']:.2%}  "
            f"speedup {speed}  FLOP ratio {row['flop_ratio']:.2f}x"
        )
    print(f"wrote {args.out}/sweep.csv and {args.out}/sweep.png")
    return 0


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="draw the merge groups on a clip (PNG grid, GIF, MP4)",
        description="Run a model with source tracing and draw which patches were merged together.",
    )
    p.add_argument("input", help="video file or folder of frames")
    p.add_argument("--model", required=True, help="built-in name, local directory or hub id")
    p.add_argument("--r", type=int, required=True, help="tokens merged per layer (per frame for TimeSformer)")
    p.add_argument("--mode", default="merge")
    p.add_argument("--layer", type=int, default=None, help="show the groups after this layer (default: the last)")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--layers", type=_ints, default=None, help="merge only in these layers (comma-separated)")
    p.add_argument("--fill", default="mean", choices=["mean", "pixels"], help="group mean colour or original pixels")
    p.add_argument("--out", default="visualize", help="output folder")
    p.set_defaults(func=_visualize)


def _visualize(args: argparse.Namespace) -> int:
    from vtome.visualize import visualize

    paths = visualize(
        args.input,
        args.model,
        args.out,
        layer=args.layer,
        fill=args.fill,
        r=args.r,
        mode=args.mode,
        start_layer=args.start_layer,
        layers=args.layers,
        seed=0,
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_splice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "splice",
        help="is merging semantic or visual? merge groups across a splice of two clips",
        description="Splice clip A with clip B (halves in time, or left/right halves in space) and "
        "count, for each layer, the merge groups that cross the splice, against A alone (control).",
    )
    p.add_argument("clip_a")
    p.add_argument("clip_b")
    p.add_argument("--model", required=True)
    p.add_argument("--r", type=int, required=True)
    p.add_argument("--mode", default="merge")
    p.add_argument("--kind", default="temporal", choices=["temporal", "spatial"])
    p.add_argument("--out", default="splice", help="folder for splice.json and splice.png")
    p.set_defaults(func=_splice)


def _splice(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vtome.analysis import plot_splice, splice_study
    from vtome.data.transforms import preprocess_for
    from vtome.visualize import load_clip
    from vtome.zoo import load_model, model_source

    model = load_model(args.model)
    pre = preprocess_for(model, model_source(args.model))
    a, b = (load_clip(p, pre).pixel_values[0] for p in (args.clip_a, args.clip_b))
    rows = splice_study(model, a, b, args.kind, r=args.r, mode=args.mode, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splice.json").write_text(json.dumps(rows, indent=2))
    plot_splice(rows, out / "splice.png", f"{args.model}, r={args.r}, {args.kind} splice")
    print(f"{'layer':>5}  {'spliced: crossing / groups':>27}  {'control: crossing / groups':>27}")
    for row in rows:
        print(
            f"{row['layer']:>5}  {row['spliced_crossing']:>12} / {row['spliced_groups']:<12}"
            f"  {row['control_crossing']:>12} / {row['control_groups']:<12}"
        )
    print(f"wrote {out}/splice.json and {out}/splice.png")
    return 0


def _add_confusion(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "confusion",
        help="how merging moved predictions: confusion difference of two evals",
        description="Difference of the confusion matrices of two `vtome eval` folders (after - "
        "before), drawn for the first K classes, and the classes that lost most accuracy.",
    )
    p.add_argument("before", help="eval folder (or confusion.json) of the reference run, e.g. unpatched")
    p.add_argument("after", help="eval folder (or confusion.json) of the merged run")
    p.add_argument("--classes", type=int, default=20, help="draw the first K classes (default 20)")
    p.add_argument("--top", type=int, default=10, help="list the N classes that lost most")
    p.add_argument("--out", default="confusion_change.png")
    p.set_defaults(func=_confusion)


def _confusion(args: argparse.Namespace) -> int:
    from vtome.analysis import confusion_change, plot_confusion_change

    change = confusion_change(args.before, args.after, args.top)
    plot_confusion_change(change, args.out, args.classes)
    moved = int(abs(change["diff"]).sum()) // 2
    print(f"{moved} predictions moved; classes that lost most:")
    for row in change["lost_most"]:
        print(f"  {row['class']}: {row['accuracy_before']:.1%} -> {row['accuracy_after']:.1%}")
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtome", description="Token merging for video transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_calibrate(sub)
    _add_demo(sub)
    _add_eval(sub)
    _add_sweep(sub)
    _add_visualize(sub)
    _add_splice(sub)
    _add_confusion(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print ``vtome CMD: error: ...`` and return 2 (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m vtome -- eval ...` (see README): the separator may reach us
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, args.command, set())
        try:
            return args.func(args)
        except (ValueError, TypeError, FileNotFoundError, MemoryError) as err:
            if type(err).__name__ != "ReportedByRankZero":  # under torchrun, process 0 says it once
                print(f"vtome {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            resume = (
                " (finished work is kept: run the same command again to resume)"
                if args.command in ("eval", "sweep")
                else ""
            )
            print(f"vtome {args.command}: interrupted{resume}", file=sys.stderr)
            return 130
        except OSError as err:  # last resort: an OS error no check caught (the message names the file)
            where = f" {err.filename}:" if err.filename else ""
            print(f"vtome {args.command}: error:{where} {err.strerror or err}", file=sys.stderr)
            return 2


def _show_warning(
    command: str,
    shown: set[str],
    message: Warning | str,
    category: type,
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """vtome's own warnings as ``vtome CMD: warning: ...``; others as Python prints them."""
    if category.__module__.startswith("vtome"):
        if str(message) not in shown:  # a sweep reads its dataset once per setting: say it once
            shown.add(str(message))
            print(f"vtome {command}: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

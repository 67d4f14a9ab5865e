"""The ``vtome`` command line: ``bench``, ``calibrate``, ``demo``, ``eval``, ``sweep``, ``visualize`` and analyses.

Every command that patches a model declares its merge options with :func:`add_merge_options` and turns
them into :func:`vtome.patch` keyword arguments with :func:`merge_kwargs`: one flag per patch argument
(``--start-layer`` -> ``start_layer``), choices from the library's constants.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence

# The command-line tools' own dependencies (the `tools` extra); importing vtome needs none of them.
TOOLS = {"rich": "rich", "matplotlib": "matplotlib", "PIL": "pillow", "av": "av"}
TOOLS_HINT = 'install the command-line tools with: pip install "vtome[tools]"'


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# patch keyword arguments taken from the command line, besides r and flops (the order of the help text)
MERGE_OPTIONS = ("mode", "threshold", "prop_attn", "head_aggregation", "start_layer", "layers", "order", "divided")


def add_merge_options(
    p: argparse.ArgumentParser,
    r: str | None = "one",
    flops: bool = False,
    required: bool = False,
    r_default: list[int] | None = None,
    skip: tuple[str, ...] = (),
) -> argparse._MutuallyExclusiveGroup:
    """Add the :func:`vtome.patch` options to ``p``. ``r="one"``: ``--r N``; ``r="list"``: ``--r 0,50,100``
    (dest ``rs``, default ``r_default``); ``flops``: ``--flops F`` as the alternative to ``--r`` (``required``:
    one of them must be given). Options in ``skip`` are left out. Defaults are None: what is not given keeps
    the library's default. Returns the group holding ``--r``/``--flops``."""
    from vtome.merge import HEAD_AGGREGATIONS, MODES, ORDERS
    from vtome.settings import DIVIDED

    amount = p.add_mutually_exclusive_group(required=required)
    if r == "one":
        amount.add_argument(
            "--r", type=int, help="tokens merged per layer (per frame for divided space-time models); 0: unpatched"
        )
    elif r == "list":
        shown = ",".join(map(str, r_default or []))
        amount.add_argument(
            "--r",
            dest="rs",
            metavar="R",
            type=_ints,
            default=r_default,
            help=f"comma-separated r values (tokens merged per layer, per frame for divided space-time models); "
            f"0 is the unpatched baseline (default: {shown})",
        )
    if flops:
        amount.add_argument(
            "--flops", type=_number, help="FLOP budget instead of --r: the fraction of the unpatched FLOPs to keep"
        )
    options: dict[str, dict] = {
        "mode": {"choices": MODES, "help": "reduction mode (default: merge)"},
        "threshold": {"type": _number, "help": "hybrid mode: cosine similarity at which pairs merge (default 0)"},
        "prop_attn": {"choices": ["on", "off"], "help": "proportional attention (default: the family's)"},
        "head_aggregation": {"choices": HEAD_AGGREGATIONS, "help": "matching keys across heads (default: mean)"},
        "start_layer": {"type": int, "help": "merge only from this layer on (default 0)"},
        "layers": {"type": _ints, "help": "merge only in these layers (comma-separated; default: all)"},
        "order": {"choices": ORDERS, "help": "matching order (default: paper, the published one)"},
        "divided": {"choices": DIVIDED, "help": "divided space-time models: matching scheme (default: per_frame)"},
    }
    for dest in MERGE_OPTIONS:
        if dest not in skip:
            p.add_argument("--" + dest.replace("_", "-"), **options[dest])
    return amount


def merge_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The :func:`vtome.patch` keyword arguments given on the command line (``r``, ``flops`` and the
    :data:`MERGE_OPTIONS`; ``--prop-attn on`` -> ``prop_attn=True``). What was not given is left out."""
    kwargs: dict[str, object] = {}
    for dest in ("r", "flops", *MERGE_OPTIONS):
        value = getattr(args, dest, None)
        if value is not None:
            kwargs[dest] = value == "on" if dest == "prop_attn" else value
    return kwargs


def _config_kwargs(cls: type, kwargs: dict[str, object]) -> dict[str, object]:
    """``kwargs`` split for a tool's config dataclass: its own fields as they are, the rest in ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)}
    own = {k: v for k, v in kwargs.items() if k in names}
    return {**own, "extra": {k: v for k, v in kwargs.items() if k not in names}}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, latency, memory and FLOPs at several r (or the GPU suite)",
        description="Measure a model unpatched and patched at each r, interleaved in one process; or, with "
        "--suite gpu, every base-size family at batch 1, 8 and 32, bf16, eager under each SDPA backend and "
        "compiled (docs/benchmark.md).",
    )
    p.add_argument("--model", help="built-in name (e.g. videomae-base), local directory or hub id")
    p.add_argument(
        "--suite",
        choices=["gpu"],
        help="the GPU suite: each base-size family unpatched and at --flops (default 0.5), batch 1,8,32, bf16, "
        "eager (SDPA backends) and torch.compile; --model picks other models",
    )
    add_merge_options(p, r="list", flops=True, r_default=[0, 50, 100, 150])
    p.add_argument("--batch-size", dest="batch_sizes", metavar="B", type=_ints, help="comma-separated (default: 1)")
    p.add_argument("--device", help="cpu or cuda (default: cpu; --suite: cuda)")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: fp32; --suite: bf16)")
    p.add_argument("--attn", default="sdpa", help="attention backend of the baseline and the patched models")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--warmup", type=int, help="warm-up forwards per variant (default: 2; --suite: 3)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: 5; --suite: 10)")
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

    from vtome.bench import BenchConfig, plot_speedup, run_benchmark, total_forwards

    if args.suite:
        return _bench_suite(args)
    if args.model is None:
        raise ValueError("give --model (or --suite gpu)")
    merge = merge_kwargs(args)
    flops = merge.pop("flops", None)
    if flops is not None:
        from vtome.calibrate import r_for_budgets

        args.rs = [0, *r_for_budgets(args.model, [flops], **merge).values()]
    cfg = BenchConfig(
        model=args.model,
        rs=args.rs,
        batch_sizes=args.batch_sizes or [1],
        device=args.device or "cpu",
        dtype=args.dtype or "fp32",
        attn=args.attn,
        compile=args.compile,
        warmup=2 if args.warmup is None else args.warmup,
        repeats=5 if args.repeats is None else args.repeats,
        threads=args.threads,
        **_config_kwargs(BenchConfig, merge),
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
    out = _console()
    out.print(
        f"[bold]{args.model}[/] · {cfg.dtype} · attn {cfg.attn} · mode {cfg.mode} · device {m['device']}"
        f" ({m['gpu'] or m['cpu']}) · torch {m['torch']} · {m['threads']} threads"
    )
    columns = ("r", "batch", "clips/s", "frames/s", "p50 ms", "p90 ms", "peak MB", "GFLOPs", "FLOP ratio")
    rows = []
    for row in report["results"]:
        mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
        rows.append(
            (
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
        )
    out.print(_table((*columns, "speedup", "of bound", "merge time"), rows))
    out.print(
        "GFLOPs per clip, transformer layers only (plus the attentive pooler for V-JEPA 2); "
        "'of bound' = speedup / FLOP ratio; 'merge time' = share of the forward spent matching and merging "
        "(the forward timed as is and with its merge steps answered from a recording, interleaved)."
    )
    if args.json:
        _write_json(args.json, report)
        out.print(f"wrote {args.json}")
    if args.plot:
        plot_speedup(report, args.plot)
        out.print(f"wrote {args.plot}")
    return 0


def _console() -> object:
    """The console results are printed on (160 columns when stdout is not a terminal)."""
    from rich.console import Console

    return Console(width=None if Console().is_terminal else 160)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> object:
    """A rich table, every column right-aligned."""
    from rich.table import Table

    table = Table()
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _write_json(path: str, report: object) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _bench_suite(args: argparse.Namespace) -> int:
    """``vtome bench --suite gpu``: :func:`vtome.bench.run_suite`, a table and JSON."""
    import transformers
    from rich.console import Console

    from vtome.bench import SUITES, SuiteConfig, run_suite

    given = [
        a.option_strings[0]
        for a in args.parser._actions
        if a.option_strings
        and a.default != argparse.SUPPRESS
        and a.dest not in ("suite", "model", "flops", "batch_sizes", "device", "dtype", "warmup", "repeats", "json")
        and getattr(args, a.dest, None) != a.default
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} do not apply to --suite, which measures its own settings "
            "(--model, --flops, --batch-size, --device, --dtype, --warmup, --repeats and --json do)"
        )
    if args.json:
        check_output_file(args.json, "--json")
    defaults = SuiteConfig()
    cfg = SuiteConfig(
        models=tuple(args.model.split(",")) if args.model else SUITES[args.suite],
        batch_sizes=tuple(args.batch_sizes or defaults.batch_sizes),
        device=args.device or defaults.device,
        dtype=args.dtype or defaults.dtype,
        flops=defaults.flops if args.flops is None else args.flops,
        warmup=defaults.warmup if args.warmup is None else args.warmup,
        repeats=defaults.repeats if args.repeats is None else args.repeats,
    )
    cfg.validate()
    transformers.utils.logging.disable_progress_bar()
    with Console(stderr=True).status("[bold]bench --suite[/] loading") as status:
        report = run_suite(cfg, on_step=lambda label: status.update(f"[bold]bench --suite[/] {label}"))
    m = report["machine"]
    out = _console()
    out.print(
        f"[bold]suite {args.suite}[/] · {cfg.dtype} · flops {cfg.flops:g} · device {m['device']}"
        f" ({m['gpu'] or m['cpu']}) · torch {m['torch']} · {report['wall_s']:.0f} s"
    )
    rows = []
    for row in report["results"]:

        def ms(key: str, row: dict = row) -> str:
            return "-" if row[key] is None else f"{row[key]:.2f}"

        rows.append(
            (
                row["model"],
                str(row["batch_size"]),
                "compiled" if row["compiled"] else "eager",
                row["backend"],
                str(row["r"]),
                f"{row['flop_ratio']:.2f}x",
                ms("unpatched_ms"),
                ms("patched_ms"),
                "-" if row["speedup"] is None else f"{row['speedup']:.2f}x",
                row["status"][:60],
            )
        )
    columns = ("model", "batch", "run", "SDPA", "r", "FLOP ratio", "unpatched ms", "patched ms", "speedup", "status")
    out.print(_table(columns, rows))
    for item in report["skipped"]:
        out.print(f"skipped: {item['model']} batch {item['batch_size']} compiled ({item['reason']})")
    if args.json:
        _write_json(args.json, report)
        out.print(f"wrote {args.json}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="the r that gives a speedup (or FLOP budget) on this device and batch size",
        description="Measure speedup against r on this device (interleaved with the unpatched model), fit "
        "where it meets --target-speedup (or measure --flops), and say plainly when merging does not pay.",
    )
    p.add_argument("--model", required=True, help="built-in name, local directory, Motionformer .pyth or hub id")
    target = add_merge_options(p, r=None, flops=True)
    target.add_argument("--target-speedup", type=float, help="wanted speedup, e.g. 2 (fits r on the measured curve)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size to calibrate for (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--attn", default="sdpa", help="attention backend (default sdpa, the fastest stock one)")
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
        target_speedup=args.target_speedup,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        **_config_kwargs(CalibrateConfig, merge_kwargs(args)),
    )
    cfg.validate()
    transformers.utils.logging.disable_progress_bar()
    console = Console(stderr=True)
    with console.status("[bold]calibrate[/] measuring"):
        report = calibrate(cfg)
    m = report["machine"]
    out = _console()
    out.print(
        f"[bold]{args.model}[/] · {cfg.dtype} · attn {cfg.attn} · mode {cfg.mode} · device {m['device']}"
        f" ({m['gpu'] or m['cpu']}) · {m['threads']} threads · batch {cfg.batch_size}"
    )
    rows = [
        (
            "baseline" if row["baseline"] else str(row["r"]),
            str(row["batch_size"]),
            f"{row['flop_ratio']:.2f}x",
            f"{row['speedup']:.2f}x",
            f"{row['clips_per_s']:.2f}",
            "-" if row["overhead_share"] is None else f"{row['overhead_share']:.1%}",
        )
        for row in report["results"]
    ]
    out.print(_table(("r", "batch", "FLOP ratio", "speedup", "clips/s", "merge time"), rows))
    for line in verdict(report):
        out.print(line)
    if args.json:
        _write_json(args.json, report)
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
    p.add_argument(
        "--flops", type=_number, default=0.5, help="FLOP budget of the main table: the fraction kept (default 0.5)"
    )
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
        cfg, clips=clips, flops=args.flops, threshold=args.threshold, timing=not args.no_timing
    )
    cfg.validate()
    if args.json:
        check_output_file(args.json, "--json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder; choose a folder name")
    out = Console(width=None if Console().is_terminal else 140)
    budgets = ", ".join(f"{f:.2g}" for f in sorted({*cfg.budgets, cfg.flops}, reverse=True))
    out.print(
        f"[bold]vtome demo[/]: {cfg.clips} generated held-out clips per model (appearance classes: what the object "
        f"is; temporal classes: how it moves); every mode at flops {budgets} (fraction of the FLOPs kept)"
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
    p.add_argument("--views", default="1x1", help="temporal clips x spatial crops, scores averaged (default 1x1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--sampling", choices=["dense", "segment"], help="frame sampling (default: per dataset)")
    p.add_argument("--sampling-rate", type=int, help="dense sampling stride (default 64 // frames)")
    p.add_argument("--noun-model", help="EPIC-KITCHENS: a second model for nouns")
    p.add_argument("--verb-classes", type=int, help="EPIC-KITCHENS: one model, first N logits are verbs")
    p.add_argument("--limit", type=int, help="first N videos only")


def _eval_config(args: argparse.Namespace, **overrides: object) -> object:
    from vtome.evaluate import EvalConfig

    return EvalConfig(
        model=args.model,
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        split=args.split,
        labels=args.labels,
        views=args.views,
        batch_size=args.batch_size,
        workers=args.workers,
        sampling=args.sampling,
        sampling_rate=args.sampling_rate,
        noun_model=args.noun_model,
        verb_classes=args.verb_classes,
        limit=args.limit,
        **_config_kwargs(EvalConfig, merge_kwargs(args)),
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
    add_merge_options(p, r="one")
    p.add_argument("--out", default="results", help="results folder (predictions.jsonl, summary.json)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from vtome.evaluate import check_merge_options, run_eval

    cfg = _eval_config(args)
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
    add_merge_options(p, r="list", r_default=[0, 50, 100, 150], skip=("mode", "start_layer"))
    p.add_argument("--modes", default="merge", help="comma-separated modes (default: merge)")
    p.add_argument("--start-layers", type=_ints, default=[0], help="comma-separated first merging layers")
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
    from vtome.merge import MODES
    from vtome.sweep import run_sweep, sweep_grid

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if any(r < 0 for r in args.rs):
        raise ValueError(f"--r values must be >= 0 (0 is the unpatched baseline); got {args.rs}")
    if bad or not modes or not args.rs:
        raise ValueError(
            f"--modes must list {', '.join(MODES)} and --r at least one value; got modes {args.modes!r}, r {args.rs}"
        )
    check_merge_options(_eval_config(args), modes)
    grid = sweep_grid(args.model, args.rs, modes, args.start_layers, args.layers, args.placements)
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
    add_merge_options(p, r="one", flops=True, required=True)
    p.add_argument("--layer", type=int, default=None, help="show the groups after this layer (default: the last)")
    p.add_argument("--fill", default="mean", choices=["mean", "pixels"], help="group mean colour or original pixels")
    p.add_argument("--out", default="visualize", help="output folder")
    p.set_defaults(func=_visualize)


def _visualize(args: argparse.Namespace) -> int:
    from vtome.visualize import visualize

    paths = visualize(args.input, args.model, args.out, layer=args.layer, fill=args.fill, seed=0, **merge_kwargs(args))
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
    add_merge_options(p, r="one", flops=True, required=True)
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
    merge = merge_kwargs(args)
    rows = splice_study(model, a, b, args.kind, seed=0, **merge)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splice.json").write_text(json.dumps(rows, indent=2))
    amount = f"r={args.r}" if args.r is not None else f"flops={args.flops:g}"
    plot_splice(rows, out / "splice.png", f"{args.model}, {amount}, {args.kind} splice")
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
    for command in sub.choices.values():
        command.set_defaults(parser=command)  # errors are told in the command's own flag names
    return parser


def missing_tools() -> list[str]:
    """The packages of the ``tools`` extra that are not installed (as pip names them)."""
    return [package for module, package in TOOLS.items() if importlib.util.find_spec(module) is None]


def in_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message in the command's words: a leading argument name (``start_layer must be ...``, as
    vtome's errors begin) becomes its flag (``--start-layer must be ...``) when the command has one."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    match = re.match(r"[a-z][a-z_]*", message)
    if match and match.group() in flags and message[match.end() : match.end() + 1] in (" ", "="):
        return flags[match.group()] + message[match.end() :]
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print ``vtome CMD: error: ...`` and return 2 (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m vtome -- eval ...` (see README): the separator may reach us
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed its usage line and error (or the help)
        return stop.code if isinstance(stop.code, int) else 2
    missing = missing_tools()
    if missing:
        print(f"vtome {args.command}: error: needs {', '.join(missing)}; {TOOLS_HINT}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, args.command, set())
        try:
            return args.func(args)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in TOOLS:
                raise
            print(f"vtome {args.command}: error: needs {TOOLS[err.name.split('.')[0]]}; {TOOLS_HINT}", file=sys.stderr)
            return 2
        except (ValueError, TypeError, FileNotFoundError, MemoryError) as err:
            if type(err).__name__ != "ReportedByRankZero":  # under torchrun, process 0 says it once
                print(f"vtome {args.command}: error: {in_flags(str(err), args.parser)}", file=sys.stderr)
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

"""The printed form of ``vtome demo``: one rich table per section, and the reading of the curve."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from vtome.demo.run import DemoConfig, reached_title


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _table(title: str, columns: list[str], rows: list[list[str]], caption: str = "") -> Table:
    table = Table(title=title, title_justify="left", caption=caption or None, caption_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "mode", "order", "scheme", "placement") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _measured(row: dict) -> list[str]:
    """The cells every demo table shares: r, FLOP ratio, appearance and temporal accuracy."""
    return [str(row["r"]), f"{row['flop_ratio']:.2f}x", _pct(row["acc_appearance"]), _pct(row["acc_temporal"])]


def _scheme(row: dict) -> str:
    return {"per_frame": "per-frame", "aligned": "aligned"}.get(row["divided"], "joint")


def _speedup(row: dict) -> str:
    if "speedup" not in row:
        return "-"
    if row["mode"] == "none":
        return "1.00x"
    lo, hi = row["speedup_iqr"]
    return f"{row['speedup']:.2f}x ({lo:.2f}-{hi:.2f})"


def print_report(report: dict, cfg: DemoConfig, console: Console) -> None:
    """Print every section of a :func:`vtome.demo.run.run_demo` report."""
    timed = (
        f"measured at batch {cfg.time_batch} on {torch.get_num_threads()} CPU threads: ratio of median latencies over "
        f"{cfg.time_rounds} interleaved rounds (in brackets: quartiles of the per-round ratios)"
    )
    console.print(
        _table(
            f"Every mode at {reached_title(report['main'], cfg.flops)}; flops: the fraction of the FLOPs kept",
            ["model", "mode", "r", "FLOP ratio", "acc appearance", "acc temporal", "speedup"],
            [
                [
                    r["model"],
                    "unpatched" if r["mode"] == "none" else r["mode"],
                    *_measured(r),
                    _speedup(r),
                ]
                for r in report["main"]
            ],
            f"r: tokens removed per layer (per frame for divided space-time models). speedup: {timed} "
            "(unpatched and every variant alternate, so background load hits all alike)."
            if cfg.timing
            else "r: tokens removed per layer (per frame for divided space-time models).",
        )
    )
    for note in report.get("notes", []):
        console.print(f"[bold]note[/]: {note}")
    console.print("[bold]Reading the accuracy-vs-FLOPs curve[/] (paired differences on the same clips, ±2 s.e.):")
    for line in report["reading"]:
        console.print(f"  - {line}")
    if report["order"]:
        console.print(
            _table(
                "Matching order, merge mode: published A/B order (paper) vs tokens kept in spatial order",
                ["model", "flops", "order", "r", "FLOP ratio", "acc appearance", "acc temporal"],
                [
                    [
                        r["model"],
                        f"{r['flops']:.2g}",
                        r["order"],
                        *_measured(r),
                    ]
                    for r in report["order"]
                ],
            )
        )
    if report["schemes"]:
        console.print(
            _table(
                "Matching schemes: joint space-time; divided space-time per-frame (published) vs aligned "
                "(one matching per clip)",
                ["model", "scheme", "mode", "flops", "r", "FLOP ratio", "acc appearance", "acc temporal", "speedup"],
                [
                    [
                        r["model"],
                        _scheme(r),
                        r["mode"],
                        f"{r['flops']:.2g}",
                        *_measured(r),
                        _speedup(r),
                    ]
                    for r in report["schemes"]
                ],
                f"speedup: {timed}." if cfg.timing else "",
            )
        )
    if report["placement"]:
        console.print(
            _table(
                "Where merging happens, merge mode at equal FLOPs "
                f"({reached_title(report['placement'], cfg.placement_flops)})",
                ["model", "placement", "r", "FLOP ratio", "acc appearance", "acc temporal"],
                [
                    [
                        r["model"],
                        r["placement"],
                        *_measured(r),
                    ]
                    for r in report["placement"]
                ],
            )
        )

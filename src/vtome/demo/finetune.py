"""Fine-tuning with token merging, measured on the bundled demo models:
``python -m vtome.demo.finetune --steps 150 --out runs/finetune``.

For each bundled model and FLOP budget (``--flops``: the fraction of the FLOPs kept; 2x and 3x fewer by
default), on the demo's held-out clips (the same clips for every model, so differences are paired, with
±2 standard errors as ``vtome demo`` reports them):

1. training-free: the bundled model merged at the budget;
2. the bundled model fine-tuned ``--steps`` steps *with* merging at the budget, evaluated merged at it;
3. the control: fine-tuned the same steps, data and learning rate *without* merging, evaluated merged at the
   budget (so that more training is told apart from training with merging);
4. the time of a training step (forward + backward, training mode) with and without merging, at batch 8 and
   32, all variants interleaved in one process, against the step's FLOP ratio.

Each fine-tuning run is the recipe's own command (``python -m vtome.demo.train --init ...``), run in this
process; its folder under ``--out`` keeps the model and its ``training.json``, and a rerun of the same command
reuses it (so the study can be run one model at a time). Writes ``finetune-<models>.json`` and ``.md`` there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vtome.demo import checkpoints, train
from vtome.demo.run import DemoConfig, ModelRun, Result, _key, _pts, paired_gap
from vtome.zoo import load_model

FAMILIES = ("appearance", "temporal")


@dataclass
class StudyConfig:
    """What the study runs; the defaults are the documented run (docs/finetuning.md)."""

    steps: int = 150
    batch_size: int = 32
    lr: float | None = None  # the recipe's fine-tuning default
    flops: tuple[float, ...] = (0.5, 0.333)  # fractions of the FLOPs kept: 2x and 3x fewer
    families: tuple[str, ...] = tuple(checkpoints.FAMILIES)
    clips: int = 450  # held-out clips (the demo's full run)
    eval_clips: int = 450  # clips of each run's own training.json evaluation
    time_batches: tuple[int, ...] = (8, 32)
    time_rounds: int = 7
    time_warmup: int = 2


def recipe(family: str, flops: float | None, cfg: StudyConfig, out: Path) -> tuple[list[str], Path]:
    """The ``python -m vtome.demo.train`` arguments of one fine-tuning run, and its folder under ``out``."""
    name = checkpoints.FAMILIES[family]
    folder = out / (f"{name}-flops{flops:g}" if flops is not None else f"{name}-no-merging")
    argv = ["--init", name, "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size)]
    argv += ["--eval-clips", str(cfg.eval_clips)]
    if checkpoints.training_record(family).get("time_reversal_augmentation"):
        argv.append("--reverse")  # as the bundled model was trained
    if cfg.lr is not None:
        argv += ["--lr", f"{cfg.lr:g}"]
    if flops is not None:
        argv += ["--flops", f"{flops:g}"]
    return argv + ["--out", str(folder)], folder


def fine_tune(argv: list[str], folder: Path) -> dict:
    """Run the recipe ``argv`` into ``folder`` (or reuse the run already there with the same command); its
    ``training.json`` record."""
    command = "python -m vtome.demo.train " + " ".join(shlex.quote(a) for a in argv)
    saved = folder / "training.json"
    if saved.exists():
        record = json.loads(saved.read_text())
        if record.get("command") != command:
            raise ValueError(
                f"{folder} holds another run ({record.get('command')!r}); choose another --out or delete that folder"
            )
        print(f"reusing {folder} ({record['train_seconds']:.0f} s of training)", flush=True)
        return record
    print(f"$ {command}", flush=True)
    train.main(argv)
    return json.loads(saved.read_text())


def run_study(cfg: StudyConfig, out: Path) -> dict:
    """Every measurement of the study for every model in ``cfg.families``; the report (JSON-ready)."""
    report: dict = {"config": asdict(cfg), "runs": [], "accuracy": [], "gaps": [], "speed": []}
    for family in cfg.families:
        name = checkpoints.FAMILIES[family]
        records = {f: fine_tune(*recipe(family, f, cfg, out)) for f in (None, *cfg.flops)}
        report["runs"] += [
            {"model": name, "flops": f, "command": r["command"], "train_seconds": r["train_seconds"]}
            for f, r in records.items()
        ]
        start = time.time()
        base = ModelRun(family, DemoConfig(clips=cfg.clips, time_rounds=cfg.time_rounds, time_warmup=cfg.time_warmup))
        tuned = {
            f: base.sibling(load_model(str(recipe(family, f, cfg, out)[1]), attn=None), _label(name, f, cfg))
            for f in records
        }
        none = base.result({})
        report["accuracy"].append(_row(name, "bundled", None, none, none))
        report["accuracy"].append(_row(name, "fine-tuned without merging", None, tuned[None].result({}), none))
        for f in cfg.flops:
            s = {"mode": "merge", "flops": f}
            free, with_merging, control = base.result(s), tuned[f].result(s), tuned[None].result(s)
            report["accuracy"] += [
                _row(name, "bundled (training-free)", f, free, none),
                _row(name, "fine-tuned with merging", f, with_merging, none),
                _row(name, "fine-tuned without merging (control)", f, control, none),
                _row(name, f"fine-tuned with merging at flops {f:g}", f, tuned[f].result({}), none, "unpatched"),
            ]
            for label, a, b in (
                ("merging cost (training-free - bundled unpatched)", free, none),
                ("fine-tuned with merging - training-free", with_merging, free),
                ("control - training-free", control, free),
                ("fine-tuned with merging - control", with_merging, control),
                ("fine-tuned with merging - bundled unpatched", with_merging, none),
            ):
                report["gaps"].append(
                    {
                        "model": name,
                        "flops": f,
                        "flop_ratio": round(free.flop_ratio, 3),
                        "comparison": label,
                        **{family_: paired_gap(a, b, family_) for family_ in FAMILIES},
                    }
                )
        eval_seconds = time.time() - start
        start = time.time()
        settings = [{"mode": "merge", "flops": f} for f in cfg.flops]
        for batch in cfg.time_batches:
            timed = base.speedups(settings, batch=batch, backward=True)
            for s in [{}, *settings]:
                res = base.result(s)
                report["speed"].append(
                    {
                        "model": name,
                        "batch_size": batch,
                        "flops": s.get("flops"),
                        "r": res.r,
                        "flop_ratio": round(res.flop_ratio, 3),
                        **timed[_key(s)],
                    }
                )
        report["runs"].append(
            {"model": name, "eval_seconds": round(eval_seconds, 1), "timing_seconds": round(time.time() - start, 1)}
        )
    report["machine"] = next((r["machine"] for r in _records(out)), None)
    report["threads"] = torch.get_num_threads()
    return report


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/training.json"))]


def _label(name: str, flops: float | None, cfg: StudyConfig) -> str:
    how = "without merging" if flops is None else f"with merging at flops {flops:g}"
    return f"{name} fine-tuned {cfg.steps} steps {how}"


def _row(name: str, what: str, flops: float | None, res: Result, none: Result, evaluated: str = "") -> dict:
    """One line of the accuracy table: ``res`` (the model ``what``, trained at ``flops``), evaluated as
    ``evaluated`` (default: at ``flops``), and its paired difference from the bundled unpatched ``none``."""
    return {
        "model": name,
        "what": what,
        "flops": flops,
        "evaluated": evaluated or ("unpatched" if flops is None else f"flops {flops:g}"),
        "r": res.r,
        "flop_ratio": round(res.flop_ratio, 3),
        "acc_appearance": res.acc("appearance"),
        "acc_temporal": res.acc("temporal"),
        **{f"{f}_vs_bundled": paired_gap(res, none, f) for f in FAMILIES},
        "clips": len(res.hits),
    }


def _gap(gap: tuple[float, float]) -> str:
    return f"{_pts(gap[0])} ± {gap[1] * 100:.1f}"


def markdown(report: dict) -> str:
    """The report as markdown tables: accuracy, paired differences, training-step times."""
    cfg = report["config"]
    lines = [
        f"Held-out clips: {cfg['clips']} per model (the demo's test split); accuracies in %; differences in "
        "points, paired on the same clips, ± 2 standard errors. flops: fraction of the FLOPs kept; "
        "flop_ratio: unpatched / patched FLOPs.",
        "",
        "| model | model state | evaluated at | r | flop_ratio | appearance | temporal | appearance vs bundled "
        "| temporal vs bundled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["accuracy"]:
        lines.append(
            f"| {r['model']} | {r['what']} | {r['evaluated']} | {r['r']} | {r['flop_ratio']:.2f}x | "
            f"{r['acc_appearance']:.1%} | {r['acc_temporal']:.1%} | {_gap(r['appearance_vs_bundled'])} | "
            f"{_gap(r['temporal_vs_bundled'])} |"
        )
    lines += [
        "",
        "| model | flops | flop_ratio | comparison | appearance (points) | temporal (points) |",
        "|---|---|---|---|---|---|",
    ]
    for g in report["gaps"]:
        lines.append(
            f"| {g['model']} | {g['flops']:g} | {g['flop_ratio']:.2f}x | {g['comparison']} | "
            f"{_gap(g['appearance'])} | {_gap(g['temporal'])} |"
        )
    lines += [
        "",
        f"Training step (forward + backward, training mode), {report['threads']} CPU threads, fp32: median over "
        f"{cfg['time_rounds']} interleaved rounds; speedup = ratio of medians (quartiles of the per-round ratios).",
        "",
        "| model | batch | flops | r | flop_ratio | step (ms) | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["speed"]:
        lo, hi = s["speedup_iqr"]
        lines.append(
            f"| {s['model']} | {s['batch_size']} | {'-' if s['flops'] is None else format(s['flops'], 'g')} | "
            f"{s['r']} | {s['flop_ratio']:.2f}x | {s['latency_ms']:.0f} | {s['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) |"
        )
    lines += ["", "| run | seconds |", "|---|---|"]
    for r in report["runs"]:
        if "command" in r:
            lines.append(f"| `{r['command']}` | {r['train_seconds']:.0f} (training) |")
        else:
            lines.append(
                f"| {r['model']}: evaluation of every model | {r['eval_seconds']:.0f} |\n"
                f"| {r['model']}: training-step timing | {r['timing_seconds']:.0f} |"
            )
    lines += ["", f"Machine: {report['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    defaults = StudyConfig()
    p = argparse.ArgumentParser(prog="python -m vtome.demo.finetune", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned models and the report")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's fine-tuning default)")
    p.add_argument("--flops", type=float, nargs="+", default=defaults.flops, help="fractions of the FLOPs kept")
    p.add_argument("--family", dest="families", nargs="+", choices=tuple(checkpoints.FAMILIES), default=None)
    p.add_argument("--clips", type=int, default=defaults.clips, help="held-out clips per model")
    p.add_argument("--eval-clips", type=int, default=defaults.eval_clips, help="clips of each run's training.json")
    p.add_argument("--time-batches", type=int, nargs="+", default=defaults.time_batches)
    p.add_argument("--time-rounds", type=int, default=defaults.time_rounds)
    args = p.parse_args(argv)
    if any(not 0.0 < f < 1.0 for f in args.flops):
        p.error(f"--flops are fractions of the FLOPs kept, in (0, 1); got {args.flops}")
    cfg = StudyConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        flops=tuple(args.flops),
        families=tuple(args.families or defaults.families),
        clips=args.clips,
        eval_clips=args.eval_clips,
        time_batches=tuple(args.time_batches),
        time_rounds=args.time_rounds,
    )
    report = run_study(cfg, args.out)
    tag = "-".join(cfg.families)
    (args.out / f"finetune-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"finetune-{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

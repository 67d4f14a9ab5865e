"""``vtome eval``: accuracy (and throughput) of a model, merged or not, on a video dataset.

Results are written as they go, one JSON line per video, so an interrupted run resumes where it stopped
(``--out`` is read back first). Unreadable videos are recorded with their error and skipped. Under
``torchrun`` each process takes a shard (gloo backend on CPU) and process 0 gathers one result.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import vtome
from vtome.data.datasets import Dataset, Sample, read_dataset
from vtome.data.transforms import Preprocess, preprocess_for
from vtome.data.video import dense_indices, list_frames, read_frames, read_video, segment_indices
from vtome.state import CapWarning, RSetting


@dataclass
class EvalConfig:
    """What to evaluate. ``views`` is ``"TxS"``: T temporal clips x S spatial crops, scores averaged."""

    model: str | nn.Module
    dataset: str
    root: str
    out: str = "results"
    split: str | None = None
    labels: str | None = None
    r: RSetting = 0
    mode: str = "merge"
    prop_attn: bool | None = None
    threshold: float = 0.0
    start_layer: int = 0
    layers: list[int] | None = None  # merge only in these layers
    views: str = "1x1"
    batch_size: int = 8
    workers: int = 0
    sampling: str | None = None  # dense | segment; default per dataset
    sampling_rate: int | None = None  # dense sampling stride; default 64 // num_frames
    noun_model: str | None = None  # EPIC: a second model for nouns
    verb_classes: int | None = None  # EPIC: one model whose logits are [verbs | nouns]
    limit: int | None = None  # first N videos only
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def view_counts(self) -> tuple[int, int]:
        try:
            t, s = (int(v) for v in self.views.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"--views must look like 1x1 or 2x3 (temporal clips x spatial crops); got {self.views!r}"
            ) from None
        if t < 1 or s < 1:
            raise ValueError(f"--views needs at least one clip and one crop; got {self.views!r}")
        return t, s

    def merge_settings(self) -> dict:
        return {
            "r": self.r,
            "mode": self.mode,
            "prop_attn": self.prop_attn,
            "threshold": self.threshold,
            "start_layer": self.start_layer,
            "layers": self.layers,
        }


class ClipLoader(torch.utils.data.Dataset):
    """Decodes, samples and preprocesses videos: item -> ``(position, [V, T, C, H, W] or None, error)``."""

    def __init__(self, samples: list[Sample], preprocess: Preprocess, sampling: str, rate: int, views: tuple[int, int]):
        self.samples, self.preprocess, self.sampling, self.rate, self.views = samples, preprocess, sampling, rate, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, load_views(self.samples[i], self.preprocess, self.sampling, self.rate, self.views), None
        except Exception as err:  # noqa: BLE001 - any unreadable video is recorded, not fatal
            return i, None, f"{type(err).__name__}: {err}"


def load_views(sample: Sample, pre: Preprocess, sampling: str, rate: int, views: tuple[int, int]) -> torch.Tensor:
    """All views of one sample: ``[T_views * S_views, frames, 3, crop, crop]``."""
    path = Path(sample.path)
    if path.is_file():
        video = read_video(path)
        total, get = len(video), lambda idx: video[idx]
    else:
        if sample.start is not None:
            files = [path / f"frame_{i:010d}.jpg" for i in range(sample.start, sample.stop + 1)]
        else:
            files = list_frames(path)
        total, get = len(files), lambda idx: read_frames(files, idx)
    t_views, s_views = views
    out = []
    for tv in range(t_views):
        if sampling == "segment":
            idx = segment_indices(total, pre.num_frames, tv, t_views)
        else:
            idx = dense_indices(total, pre.num_frames, rate, tv, t_views)
        frames = get(idx)
        for sv in range(s_views):
            out.append(pre(frames, 0.5 if s_views == 1 else sv / (s_views - 1)))
    return torch.stack(out)


def _read_done(out: Path) -> dict[str, dict]:
    """Predictions already written under ``out`` (merged file and per-process files); torn lines skipped."""
    done: dict[str, dict] = {}
    for path in sorted(out.glob("predictions*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _top5(probs: torch.Tensor) -> list[list]:
    k = min(5, probs.shape[-1])
    scores, idx = probs.topk(k)
    return [[int(i), round(float(s), 5)] for i, s in zip(idx, scores)]


class _Predictor:
    """Model(s) -> per-sample prediction records (class probabilities averaged over views)."""

    def __init__(self, cfg: EvalConfig, model: nn.Module, noun_model: nn.Module | None, epic: bool) -> None:
        self.model, self.noun_model, self.epic, self.verb_classes = model, noun_model, epic, cfg.verb_classes
        if epic and noun_model is None and not cfg.verb_classes:
            raise ValueError(
                "EPIC-KITCHENS needs verb and noun scores: pass --noun-model (a second model) or "
                "--verb-classes N (one model whose first N logits are verbs, the rest nouns)"
            )
        self.seconds = 0.0

    def _probs(self, model: nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
        logits = model(pixel_values=x).logits.float()
        return logits.softmax(-1).view(-1, views, logits.shape[-1]).mean(1)

    @torch.inference_mode()
    def __call__(self, clips: torch.Tensor, samples: list[Sample]) -> list[dict]:
        b, v = clips.shape[:2]
        x = clips.flatten(0, 1)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CapWarning)
            if not self.epic:
                probs = self._probs(self.model, x, v)
            elif self.noun_model is not None:
                verb, noun = self._probs(self.model, x, v), self._probs(self.noun_model, x, v)
            else:
                logits = self.model(pixel_values=x).logits.float()
                split = self.verb_classes
                verb = logits[:, :split].softmax(-1).view(b, v, -1).mean(1)
                noun = logits[:, split:].softmax(-1).view(b, v, -1).mean(1)
        self.seconds += time.perf_counter() - start
        records = []
        for i, s in enumerate(samples):
            if not self.epic:
                records.append({"id": s.id, "label": s.label, "top5": _top5(probs[i])})
            else:
                action = (verb[i][:, None] * noun[i][None, :]).flatten()
                top = _top5(action)
                n_noun = noun.shape[-1]
                records.append(
                    {
                        "id": s.id,
                        "verb": s.verb,
                        "noun": s.noun,
                        "verb_top5": _top5(verb[i]),
                        "noun_top5": _top5(noun[i]),
                        "action_top5": [[[a // n_noun, a % n_noun], p] for a, p in top],
                    }
                )
        return records


def _load(model: str | nn.Module, cfg: EvalConfig) -> tuple[nn.Module, str | None]:
    from vtome.zoo import load_model, model_source

    if isinstance(model, nn.Module):
        net, source = model.eval(), None
    else:
        net, source = load_model(model), model_source(model)
    if cfg.r != 0:
        vtome.patch(
            net,
            r=cfg.r,
            mode=cfg.mode,
            prop_attn=cfg.prop_attn,
            threshold=cfg.threshold,
            start_layer=cfg.start_layer,
            layers=cfg.layers,
            seed=0,
        )
    return net, source


def run_eval(cfg: EvalConfig, on_progress: Callable[[int, int, float | None], None] | None = None) -> dict:
    """Evaluate; returns the summary (also written to ``out/summary.json``)."""
    views = cfg.view_counts()
    data = read_dataset(cfg.dataset, cfg.root, cfg.split, cfg.labels)
    samples = data.samples[: cfg.limit] if cfg.limit else data.samples
    model, source = _load(cfg.model, cfg)
    noun_model = _load(cfg.noun_model, cfg)[0] if cfg.noun_model else None
    epic = data.name == "epic"
    predictor = _Predictor(cfg, model, noun_model, epic)
    pre = preprocess_for(model, source)
    sampling = cfg.sampling or data.sampling
    if sampling not in ("dense", "segment"):
        raise ValueError(f"--sampling must be dense or segment; got {sampling!r}")
    rate = cfg.sampling_rate or max(1, 64 // pre.num_frames)

    own_group = False
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        own_group = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    done = _read_done(out)
    todo = [s for s in samples[rank::world] if s.id not in done]
    loader = torch.utils.data.DataLoader(
        ClipLoader(todo, pre, sampling, rate, views),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=list,
    )
    mine = out / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    hits, seen = [], 0
    with mine.open("a") as f:
        if on_progress:
            on_progress(0, len(todo), None)
        for batch in loader:
            good = [(todo[i], clip) for i, clip, err in batch if clip is not None]
            records = [{"id": todo[i].id, **_labels(todo[i]), "error": err} for i, _, err in batch if err is not None]
            if good:
                records += predictor(torch.stack([c for _, c in good]), [s for s, _ in good])
            for record in records:
                f.write(json.dumps(record) + "\n")
                if "error" not in record:
                    hits.append(_correct(record))
            f.flush()
            seen += len(batch)
            if on_progress:
                on_progress(seen, len(todo), sum(hits) / len(hits) if hits else None)
    evaluated = len(hits)
    throughput = evaluated / predictor.seconds if predictor.seconds > 0 else None
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (evaluated, predictor.seconds))
        total_seconds = max(s for _, s in gathered)
        throughput = sum(n for n, _ in gathered) / total_seconds if total_seconds > 0 else None
    if rank == 0:
        _finalize(out, data, samples, throughput, cfg, epic)
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return json.loads((out / "summary.json").read_text())


def _labels(s: Sample) -> dict:
    return {"verb": s.verb, "noun": s.noun} if s.verb is not None else {"label": s.label}


def _correct(record: dict) -> bool:
    if "top5" in record:
        return record["top5"][0][0] == record["label"]
    return record["action_top5"][0][0] == [record["verb"], record["noun"]]


def _finalize(
    out: Path, data: Dataset, samples: list[Sample], throughput: float | None, cfg: EvalConfig, epic: bool
) -> None:
    """Merge per-process files into ``predictions.jsonl`` (dataset order) and write ``summary.json``."""
    done = _read_done(out)
    ordered = [done[s.id] for s in samples if s.id in done]
    tmp = out / "predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    tmp.replace(out / "predictions.jsonl")
    for path in out.glob("predictions.rank*.jsonl"):
        path.unlink()
    ok = [r for r in ordered if "error" not in r]
    summary: dict = {
        "model": cfg.model if isinstance(cfg.model, str) else type(cfg.model).__name__,
        "dataset": data.name,
        "num_videos": len(samples),
        "num_evaluated": len(ok),
        "num_failed": len(ordered) - len(ok),
        "num_missing": len(samples) - len(ordered),
        "clips_per_s": throughput,
        "views": cfg.views,
        "merge": cfg.merge_settings(),
    }
    if epic:

        def acc(key: str, truth: Callable[[dict], object], k: int) -> float:
            return sum(any(p == truth(r) for p, _ in r[key][:k]) for r in ok) / max(len(ok), 1)

        for part in ("verb", "noun"):
            summary[f"{part}_top1"] = acc(f"{part}_top5", lambda r, part=part: r[part], 1)
            summary[f"{part}_top5"] = acc(f"{part}_top5", lambda r, part=part: r[part], 5)
        summary["action_top1"] = acc("action_top5", lambda r: [r["verb"], r["noun"]], 1)
        summary["action_top5"] = acc("action_top5", lambda r: [r["verb"], r["noun"]], 5)
        summary["top1"], summary["top5"] = summary["action_top1"], summary["action_top5"]
    else:
        num_classes = max([r["label"] for r in ok] + [r["top5"][0][0] for r in ok] + [len(data.classes or []) - 1])
        confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
        for r in ok:
            confusion[r["label"], r["top5"][0][0]] += 1
        summary["top1"] = sum(r["top5"][0][0] == r["label"] for r in ok) / max(len(ok), 1)
        summary["top5"] = sum(any(p == r["label"] for p, _ in r["top5"]) for r in ok) / max(len(ok), 1)
        names = data.classes or [str(i) for i in range(num_classes + 1)]
        totals = confusion.sum(1)
        summary["per_class_accuracy"] = {
            (names[c] if c < len(names) else str(c)): float(confusion[c, c] / totals[c])
            for c in range(len(totals))
            if totals[c]
        }
        (out / "confusion.json").write_text(json.dumps({"classes": names, "matrix": confusion.tolist()}))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

"""``vtome eval``: accuracy (and throughput) of a model, merged or not, on a video dataset.

Results are written as they go, one JSON line per video, so an interrupted run resumes where it stopped
(``--out`` is read back first). ``--out`` also holds a manifest of everything that determines a
prediction; resuming with other settings is refused, as is a second run writing the same folder at the
same time (see :mod:`vtome.outdir`). Every option and label is checked before anything is evaluated.
Unreadable videos are recorded with their reason and the run goes on. Under ``torchrun`` each process
takes a shard (gloo backend on CPU) and process 0 gathers one result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import vtome
from vtome.adapters.inputs import clip_kwargs
from vtome.data.datasets import DATASETS, Dataset, DatasetError, Sample, read_dataset
from vtome.data.transforms import Preprocess, preprocess_for
from vtome.data.video import VideoReadError, dense_indices, list_frames, read_frames, sample_video, segment_indices
from vtome.merger import CapWarning
from vtome.outdir import (
    FORMAT,
    OutputError,
    ReportedByRankZero,
    RunLock,
    check_manifest,
    file_digest,
    fold_timing,
    prediction_files,
    prepare,
    read_records,
    repair_predictions,
    throughput,
    write_error,
    write_timing,
)
from vtome.settings import RSetting


class EvalWarning(UserWarning):
    """Something the user should know before trusting an evaluation (e.g. how classes were numbered)."""


@dataclass
class EvalConfig:
    """What to evaluate. ``views`` is ``"TxS"``: T temporal clips x S spatial crops, scores averaged.
    ``extra`` holds further :func:`vtome.patch` keyword arguments (e.g. ``{"order": "spatial"}``)."""

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
    noun_model: str | nn.Module | None = None  # EPIC: a second model for nouns
    verb_classes: int | None = None  # EPIC: one model whose logits are [verbs | nouns]
    limit: int | None = None  # first N videos only
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def view_counts(self) -> tuple[int, int]:
        """``(temporal clips, spatial crops)`` from ``views``."""
        try:
            t, s = (int(v) for v in str(self.views).lower().split("x"))
        except ValueError:
            raise ValueError(
                f"--views must look like 1x1 or 2x3 (temporal clips x spatial crops); got {self.views!r}"
            ) from None
        if t < 1 or s < 1:
            raise ValueError(f"--views needs at least one clip and one crop; got {self.views!r}")
        return t, s

    def validate(self) -> None:
        """Check the options on their own (``ValueError`` naming the option); data and model come later."""

        def whole(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        self.view_counts()
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        if not whole(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be an integer >= 1 (videos per forward); got {self.batch_size!r}")
        if not whole(self.workers) or self.workers < 0:
            raise ValueError(
                f"--workers must be an integer >= 0 (decoding processes; 0 decodes inline); got {self.workers!r}"
            )
        if self.limit is not None and (not whole(self.limit) or self.limit < 1):
            raise ValueError(f"--limit must be an integer >= 1 (evaluate the first N videos); got {self.limit!r}")
        if self.sampling not in (None, "dense", "segment"):
            raise ValueError(f"--sampling must be dense or segment; got {self.sampling!r}")
        if self.sampling_rate is not None and (not whole(self.sampling_rate) or self.sampling_rate < 1):
            raise ValueError(
                f"--sampling-rate must be an integer >= 1 (frames between sampled frames); got {self.sampling_rate!r}"
            )
        if self.sampling_rate is not None and self.sampling == "segment":
            raise ValueError(
                "--sampling-rate applies to dense sampling; segment sampling spreads frames over the video"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"--threshold must be a number in [-1, 1]; got {self.threshold!r}")
        if not str(self.out).strip():
            raise ValueError("--out must name a folder")
        if self.dataset != "epic" and (self.verb_classes is not None or self.noun_model is not None):
            raise ValueError("--verb-classes and --noun-model are for --dataset epic only")
        if self.verb_classes is not None and self.noun_model is not None:
            raise ValueError(
                "pass either --noun-model (a second model for nouns) or --verb-classes (one model whose first N "
                "logits are verbs), not both"
            )
        if self.verb_classes is not None and (not whole(self.verb_classes) or self.verb_classes < 1):
            raise ValueError(f"--verb-classes must be an integer >= 1; got {self.verb_classes!r}")

    def merge_settings(self) -> dict:
        """The merge options as given (before the model's defaults are filled in)."""
        return {
            "r": self.r,
            "mode": self.mode,
            "prop_attn": self.prop_attn,
            "threshold": self.threshold,
            "start_layer": self.start_layer,
            "layers": self.layers,
            **self.extra,
        }


def check_merge_options(cfg: EvalConfig, modes: list[str] | None = None) -> None:
    """``ValueError`` for a merge option given where it cannot take effect: any of them when ``cfg.r`` is 0
    (the model is evaluated unpatched; ``modes`` None, i.e. ``vtome eval``), and ``--threshold`` when no mode
    (``cfg.mode``, or any of a sweep's ``modes``) is hybrid."""
    if modes is None and cfg.r == 0:
        given = [
            (flag, value)
            for flag, value, default in (
                ("--mode", cfg.mode, "merge"),
                ("--threshold", cfg.threshold, 0.0),
                ("--prop-attn", cfg.prop_attn, None),
                ("--start-layer", cfg.start_layer, 0),
                ("--layers", cfg.layers, None),
                *((f"--{key.replace('_', '-')}", value, None) for key, value in cfg.extra.items()),
            )
            if value != default
        ]
        if given:
            flag, value = given[0]
            raise ValueError(
                f"{flag} {value} has no effect with --r 0 (the model is evaluated unpatched); give --r > 0 to merge, "
                f"or leave {flag} out"
            )
    if cfg.threshold != 0.0 and "hybrid" not in (modes if modes is not None else [cfg.mode]):
        raise ValueError(
            f"--threshold {cfg.threshold} has no effect without --mode hybrid (only hybrid merging uses a similarity "
            "threshold); add hybrid to the modes or leave --threshold out"
        )


class ClipLoader(torch.utils.data.Dataset):
    """Decodes, samples and preprocesses videos: item -> ``(position, [V, T, C, H, W] or None, error)``."""

    def __init__(self, samples: list[Sample], preprocess: Preprocess, sampling: str, rate: int, views: tuple[int, int]):
        self.samples, self.preprocess, self.sampling, self.rate, self.views = samples, preprocess, sampling, rate, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, load_views(self.samples[i], self.preprocess, self.sampling, self.rate, self.views), None
        except VideoReadError as err:
            return i, None, str(err)
        except Exception as err:  # noqa: BLE001 - any unreadable video is recorded, not fatal
            return i, None, f"{self.samples[i].path}: {type(err).__name__}: {err}"


def load_views(sample: Sample, pre: Preprocess, sampling: str, rate: int, views: tuple[int, int]) -> torch.Tensor:
    """All views of one sample: ``[T_views * S_views, frames, 3, crop, crop]``. Only the sampled frames are
    decoded and kept."""
    t_views, s_views = views

    def pick(total: int) -> list[int]:
        idx: list[int] = []
        for tv in range(t_views):
            if sampling == "segment":
                idx += segment_indices(total, pre.num_frames, tv, t_views)
            else:
                idx += dense_indices(total, pre.num_frames, rate, tv, t_views)
        return idx

    path = Path(sample.path)
    if path.is_file():
        frames = sample_video(path, pick)
    elif path.is_dir():
        if sample.start is not None:
            files = [path / f"frame_{i:010d}.jpg" for i in range(sample.start, sample.stop + 1)]
        else:
            files = list_frames(path)
        frames = read_frames(files, pick(len(files)))
    else:
        raise VideoReadError(f"{path}: no such video file or frame folder")
    out = []
    for tv in range(t_views):
        clip = frames[tv * pre.num_frames : (tv + 1) * pre.num_frames]
        for sv in range(s_views):
            out.append(pre(clip, 0.5 if s_views == 1 else sv / (s_views - 1)))
    return torch.stack(out)


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
        self.seconds, self.clips, self.warm = 0.0, 0, False

    def _probs(self, model: nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
        logits = model(**clip_kwargs(model, x)).logits.float()
        return logits.softmax(-1).view(-1, views, logits.shape[-1]).mean(1)

    def _forward(self, x: torch.Tensor, b: int, v: int) -> tuple[torch.Tensor, ...]:
        """Class probabilities of ``x`` ``[b * v, T, C, H, W]``: ``(probs,)``, or ``(verb, noun)`` for EPIC."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CapWarning)
                if not self.epic:
                    return (self._probs(self.model, x, v),)
                if self.noun_model is not None:
                    return self._probs(self.model, x, v), self._probs(self.noun_model, x, v)
                logits = self.model(**clip_kwargs(self.model, x)).logits.float()
                split = self.verb_classes
                verb = logits[:, :split].softmax(-1).view(b, v, -1).mean(1)
                return verb, logits[:, split:].softmax(-1).view(b, v, -1).mean(1)
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err):
                raise MemoryError(
                    f"out of memory in a forward of {b} videos x {v} views: lower --batch-size (or --views). "
                    "Predictions finished so far are kept; run again to resume"
                ) from None
            raise

    @torch.inference_mode()
    def __call__(self, clips: torch.Tensor, samples: list[Sample]) -> list[dict]:
        b, v = clips.shape[:2]
        x = clips.flatten(0, 1)
        if not self.warm:  # one-time costs (first-touch allocation, lazy init) stay out of the measured speed
            self._forward(x, b, v)
            self.warm = True
        start = time.perf_counter()
        out = self._forward(x, b, v)
        self.seconds += time.perf_counter() - start
        self.clips += b
        probs = out[0]
        verb, noun = out if self.epic else (None, None)
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


# -- model and settings -----------------------------------------------------------------------------


def _load(model: str | nn.Module) -> tuple[nn.Module, str | None]:
    from vtome.zoo import load_model, model_source

    if isinstance(model, nn.Module):
        return model.eval(), None
    return load_model(model), model_source(model)


def model_identity(model: nn.Module, name: str | nn.Module) -> dict:
    """``{class, fingerprint}``: SHA-256 of the config (minus paths and versions) and of every parameter and
    buffer (persistent or not): its name, shape, dtype and all of its bytes, read tensor by tensor (a change
    to any single value changes it)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        described = {
            k: v
            for k, v in config.to_dict().items()
            if k not in ("transformers_version", "_name_or_path", "_attn_implementation_autoset")
        }
        h.update(json.dumps(described, sort_keys=True, default=str).encode())
    tensors = dict(model.state_dict())
    for key, buffer in model.named_buffers():
        tensors.setdefault(key, buffer)  # non-persistent buffers are part of what the model computes too
    for key, tensor in tensors.items():
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.is_meta:
            raise ValueError(f"{key} of {name!r} has no values (a meta tensor); load the model's weights first")
        try:
            data = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(data.view(torch.uint8).numpy() if data.numel() else b"")
        except (RuntimeError, TypeError):  # sparse or quantized storage: hash its serialised form
            buffer = io.BytesIO()
            torch.save(tensor.detach().cpu(), buffer)
            h.update(buffer.getvalue())
    return {"class": type(model).__name__, "fingerprint": h.hexdigest()[:32]}


def apply_merge(model: nn.Module, cfg: EvalConfig, keep: bool = True) -> dict:
    """Patch ``model`` as ``cfg`` asks (``r != 0``) and return every merge setting (all fields of
    :class:`vtome.MergeSettings`, plus ``patched``). For ``r == 0`` (or ``keep=False``) the model is left
    unpatched and the settings are those a patch would have used (a patch is made, read and undone, which
    also checks them)."""
    from vtome.adapters import adapter_for

    kwargs = {**cfg.merge_settings(), "seed": 0}
    try:
        adapter_for(model)
    except TypeError:
        if cfg.r != 0:
            raise
        return {"patched": False, **kwargs}  # a model vtome cannot patch, evaluated as it is
    vtome.patch(model, **kwargs)
    settings = dataclasses.asdict(vtome.settings(model))
    if cfg.r == 0 or not keep:
        vtome.unpatch(model)
    return {"patched": cfg.r != 0, **settings}


def _num_labels(model: nn.Module) -> int | None:
    n = getattr(getattr(model, "config", None), "num_labels", None)
    return n if isinstance(n, int) and n > 0 else None


def _label2id(model: nn.Module) -> dict[str, int] | None:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and id2label:
        return {str(v): int(k) for k, v in id2label.items()}
    return None


def check_labels(
    samples: list[Sample], model: nn.Module, noun_model: nn.Module | None, cfg: EvalConfig, epic: bool
) -> None:
    """Every label within the model's classes (EPIC: verbs and nouns within their parts of the logits);
    ``DatasetError`` naming the file and line of the first bad ones otherwise."""
    n = _num_labels(model)
    if n is None:
        return
    if not epic:
        checks = [("label", n, "the model has {n} classes (0..{last})")]
    elif noun_model is not None:
        m = _num_labels(noun_model) or sys.maxsize
        checks = [
            ("verb", n, "the verb model has {n} classes (0..{last})"),
            ("noun", m, "the noun model has {n} classes (0..{last})"),
        ]
    else:
        if cfg.verb_classes >= n:
            raise ValueError(
                f"--verb-classes {cfg.verb_classes} leaves no noun classes: the model has {n} logits, the first "
                "--verb-classes of them verbs and the rest nouns; pass the number of verb classes "
                "(EPIC-KITCHENS-100: 97)"
            )
        checks = [
            ("verb", cfg.verb_classes, "--verb-classes gives {n} verb classes (0..{last})"),
            ("noun", n - cfg.verb_classes, "the model's {n} logits after --verb-classes are nouns (0..{last})"),
        ]
    for key, limit, what in checks:
        bad = [s for s in samples if not 0 <= getattr(s, key) < limit]
        if bad:
            first = bad[0]
            raise DatasetError(
                f"{first.where or first.id}: {key} {getattr(first, key)} of {first.id} is out of range: "
                + what.format(n=limit, last=limit - 1)
                + (f"; {len(bad) - 1} more labels are out of range" if len(bad) > 1 else "")
                + ". Check the split file against the model's classes"
            )


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(batch: int, views: tuple[int, int], pre: Preprocess) -> None:
    """``ValueError`` when one batch of input clips alone would not fit in this machine's memory."""
    total = _physical_memory()
    need = batch * views[0] * views[1] * pre.num_frames * 3 * pre.crop * pre.crop * 4 * 2  # clips and their copy
    if total and need > total // 2:
        raise ValueError(
            f"--batch-size {batch} with --views {views[0]}x{views[1]} needs at least {need / 2**30:.1f} GiB for its "
            f"input clips alone (this machine has {total / 2**30:.1f} GiB); use a smaller --batch-size"
        )


def build_manifest(
    cfg: EvalConfig,
    model: nn.Module,
    merge: dict,
    noun_model: nn.Module | None,
    data: Dataset,
    pre: Preprocess,
    sampling: str,
    rate: int | None,
    identity: dict,
    noun_identity: dict | None,
) -> dict:
    """``settings`` (compared on resume: everything that determines a prediction) and ``about`` (for people)."""
    t, s = cfg.view_counts()
    settings = {
        "model": identity,
        "merge": merge,
        "input": {
            "num_frames": pre.num_frames,
            "resize": pre.resize,
            "crop": pre.crop,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "sampling": sampling,
            "sampling_rate": rate if sampling == "dense" else None,
            "views": f"{t}x{s}",
        },
        "data": {
            "dataset": cfg.dataset,
            "root": str(Path(cfg.root).resolve()),
            "files": {str(p.resolve()): file_digest(p) for p in data.files},
            "label_source": data.label_source,
            "classes": hashlib.sha256(json.dumps(data.classes).encode()).hexdigest()[:16],
        },
    }
    if data.name == "epic":
        settings["epic"] = {"verb_classes": cfg.verb_classes, "noun_model": noun_identity}
    name = cfg.model if isinstance(cfg.model, str) else type(cfg.model).__name__
    about = {
        "model": name,
        "noun_model": cfg.noun_model if isinstance(cfg.noun_model, str) or cfg.noun_model is None else "module",
        "command": " ".join(["vtome", *sys.argv[1:]]) if "vtome" in Path(sys.argv[0]).parts[-2:] else None,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "vtome": vtome.__version__,
        "torch": torch.__version__,
    }
    return json.loads(json.dumps({"format": FORMAT, "settings": settings, "about": about}, default=str))


# -- the run ----------------------------------------------------------------------------------------


def run_eval(cfg: EvalConfig, on_progress: Callable[[int, int, float | None], None] | None = None) -> dict:
    """Evaluate; returns the summary (also written to ``out/summary.json``)."""
    cfg.validate()
    views = cfg.view_counts()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    model, source = _load(cfg.model)
    identity = model_identity(model, cfg.model)
    merge = apply_merge(model, cfg)
    noun_model = noun_identity = None
    if cfg.noun_model is not None:
        noun_model = _load(cfg.noun_model)[0]
        noun_identity = model_identity(noun_model, cfg.noun_model)
        apply_merge(noun_model, cfg)
    data = read_dataset(cfg.dataset, cfg.root, cfg.split, cfg.labels, label2id=_label2id(model))
    if rank == 0:
        for note in data.notes:
            warnings.warn(note, EvalWarning, stacklevel=2)
    samples = data.samples[: cfg.limit] if cfg.limit is not None else data.samples
    epic = data.name == "epic"
    predictor = _Predictor(cfg, model, noun_model, epic)
    check_labels(samples, model, noun_model, cfg, epic)
    pre = preprocess_for(model, source)
    sampling = cfg.sampling or data.sampling
    if cfg.sampling_rate is not None and sampling == "segment":
        raise ValueError(
            f"--sampling-rate has no effect here: --dataset {cfg.dataset} samples segments (frames spread over the "
            "video) by default; add --sampling dense to sample every --sampling-rate frames instead"
        )
    rate = cfg.sampling_rate or max(1, 64 // pre.num_frames)
    check_memory(min(cfg.batch_size, len(samples)), views, pre)
    manifest = build_manifest(cfg, model, merge, noun_model, data, pre, sampling, rate, identity, noun_identity)

    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        own_group = True
    out = Path(cfg.out)
    lock = RunLock(out, "vtome eval")
    problem: list = [None]
    if rank == 0:
        try:
            prepare(out)
            lock.acquire()
            check_manifest(out, manifest)  # first: a folder of other settings is left as it is
            fold_timing(out)  # a killed session's measured time is kept
            for note in repair_predictions(out):
                warnings.warn(note, EvalWarning, stacklevel=2)
        except (OutputError, OSError) as err:
            lock.release()
            problem = [err if isinstance(err, OutputError) else write_error(out, err)]
    if world > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        if own_group:
            dist.destroy_process_group()
        raise problem[0] if rank == 0 else ReportedByRankZero(str(problem[0]))
    try:
        return _evaluate(cfg, out, data, samples, predictor, pre, sampling, rate, views, epic, world, rank, on_progress)
    finally:
        lock.release()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _evaluate(
    cfg: EvalConfig,
    out: Path,
    data: Dataset,
    samples: list[Sample],
    predictor: _Predictor,
    pre: Preprocess,
    sampling: str,
    rate: int,
    views: tuple[int, int],
    epic: bool,
    world: int,
    rank: int,
    on_progress: Callable[[int, int, float | None], None] | None,
) -> dict:
    if world > 1:
        dist.barrier()
    done = read_records(out)
    _check_done_labels(done, data.samples, out)
    todo = [s for s in samples[rank::world] if s.id not in done or "error" in done[s.id]]  # failures are retried
    loader = torch.utils.data.DataLoader(
        ClipLoader(todo, pre, sampling, rate, views),
        batch_size=max(1, min(cfg.batch_size, len(todo))),
        num_workers=cfg.workers,
        collate_fn=list,
    )
    mine = out / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    hits, seen = [], 0
    try:
        f = mine.open("a")
    except OSError as err:
        raise write_error(mine, err) from None
    with f, _worker_deaths():
        if on_progress:
            on_progress(0, len(todo), None)
        for batch in loader:
            good = [(todo[i], clip) for i, clip, err in batch if clip is not None]
            records = [{"id": todo[i].id, **_labels(todo[i]), "error": err} for i, _, err in batch if err is not None]
            if good:
                records += predictor(torch.stack([c for _, c in good]), [s for s, _ in good])
            try:
                f.write("".join(json.dumps(record) + "\n" for record in records))
                f.flush()
            except OSError as err:
                raise write_error(mine, err) from None
            write_timing(out, rank, predictor.clips, predictor.seconds)
            hits += [_correct(r) for r in records if "error" not in r]
            seen += len(batch)
            if on_progress:
                on_progress(seen, len(todo), sum(hits) / len(hits) if hits else None)
    if world > 1:
        dist.barrier()
    if rank == 0:
        _finalize(out, data, samples, cfg, epic)
    if world > 1:
        dist.barrier()
    return json.loads((out / "summary.json").read_text())


class WorkerLost(MemoryError):
    """A decoding worker process ended without reporting (killed by the system, most often for lack of memory)."""


@contextlib.contextmanager
def _worker_deaths() -> Iterator[None]:
    """A decoding worker that dies (an out-of-memory kill looks like this) ends the run with
    :class:`WorkerLost`, which says that finished predictions are kept. PyTorch reports the death from a
    signal handler, so it can surface anywhere in the loop, not only where the loader is read."""
    try:
        yield
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        what = str(err).strip().splitlines()[0].strip().rstrip(". ")
        raise WorkerLost(
            f"{what}: a decoding worker process was ended by the system, most often for lack of memory (an "
            "out-of-memory kill). Predictions finished so far are kept; run the same command again to resume, "
            "with fewer --workers or a smaller --batch-size if memory is short"
        ) from None


def _check_done_labels(done: dict[str, dict], samples: list[Sample], out: Path) -> None:
    changed = [s for s in samples if s.id in done and any(done[s.id].get(k) != v for k, v in _labels(s).items())]
    if changed:
        s = changed[0]
        raise OutputError(
            f"{out} holds predictions whose labels differ from the dataset's now ({len(changed)} videos, e.g. "
            f"{s.id}: {_labels(s)} now, {dict((k, done[s.id].get(k)) for k in _labels(s))} then); use another "
            f"--out, or delete {out} to start over"
        )


def _labels(s: Sample) -> dict:
    return {"verb": s.verb, "noun": s.noun} if s.verb is not None else {"label": s.label}


def _correct(record: dict) -> bool:
    if "top5" in record:
        return record["top5"][0][0] == record["label"]
    return record["action_top5"][0][0] == [record["verb"], record["noun"]]


def _finalize(out: Path, data: Dataset, samples: list[Sample], cfg: EvalConfig, epic: bool) -> None:
    """Merge per-process files into ``predictions.jsonl`` (dataset order; records of videos outside this
    run's ``--limit`` are kept) and write ``summary.json`` over this run's videos."""
    done = read_records(out)
    position = {s.id: i for i, s in enumerate(data.samples)}
    ids = sorted(done, key=lambda i: position.get(i, len(position)))
    tmp = out / "predictions.jsonl.tmp"
    try:
        tmp.write_text("".join(json.dumps(done[i]) + "\n" for i in ids))
        tmp.replace(out / "predictions.jsonl")
        for path in prediction_files(out)[1:]:
            path.unlink()
        fold_timing(out)
    except OSError as err:
        raise write_error(tmp, err) from None
    ordered = [done[s.id] for s in samples if s.id in done]
    ok = [r for r in ordered if "error" not in r]
    speed, timed = throughput(out)
    manifest = json.loads((out / "manifest.json").read_text())
    summary: dict = {
        "model": manifest["about"]["model"],
        "model_fingerprint": manifest["settings"]["model"]["fingerprint"],
        "dataset": data.name,
        "num_videos": len(samples),
        "num_evaluated": len(ok),
        "num_failed": len(ordered) - len(ok),
        "num_missing": len(samples) - len(ordered),
        "limit": cfg.limit,
        "clips_per_s": speed,
        "timed_clips": timed,
        "views": manifest["settings"]["input"]["views"],
        "sampling": manifest["settings"]["input"]["sampling"],
        "label_source": data.label_source,
        "notes": data.notes,
        "merge": manifest["settings"]["merge"],
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
        _write(out / "confusion.json", json.dumps({"classes": names, "matrix": confusion.tolist()}))
    _write(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def _write(path: Path, text: str) -> None:
    try:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        raise write_error(path, err) from None

"""Dataset layouts -> lists of samples: Kinetics-400, Something-Something v2, EPIC-KITCHENS-100, and any
folder-per-class tree. Each sample is a video file or a folder of frames, with its label(s)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vtome.data.video import FRAME_EXTS, VIDEO_EXTS

DATASETS = ("k400", "ssv2", "epic", "folder")


@dataclass(frozen=True)
class Sample:
    """One video: ``path`` (a file or a frame folder), its class ``label`` (or ``verb``/``noun`` for
    EPIC-KITCHENS), and for EPIC the 1-based frame range ``start``..``stop`` of the action."""

    id: str
    path: str
    label: int | None = None
    verb: int | None = None
    noun: int | None = None
    start: int | None = None
    stop: int | None = None


@dataclass
class Dataset:
    name: str
    samples: list[Sample]
    classes: list[str] | None = None  # index -> name, when known
    sampling: str = "dense"  # default frame sampling: dense (K400-style) or segment (SSv2/EPIC-style)


def read_dataset(
    kind: str, root: str | Path, split: str | Path | None = None, labels: str | Path | None = None
) -> Dataset:
    """Read a dataset of ``kind`` (k400, ssv2, epic, folder) under ``root``; see the README for layouts."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    if kind == "k400":
        return _kinetics(root, split, labels)
    if kind == "ssv2":
        return _ssv2(root, split, labels)
    if kind == "epic":
        return _epic(root, split)
    if kind == "folder":
        return _folder(root, "folder")
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}; got {kind!r}")


def _is_video_or_frames(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in VIDEO_EXTS
    return path.is_dir() and any(p.suffix.lower() in FRAME_EXTS for p in path.iterdir())


def _folder(root: Path, name: str) -> Dataset:
    """``root/<class name>/<video file or frame folder>``; classes in sorted name order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = []
    for index, cls in enumerate(classes):
        for item in sorted((root / cls).iterdir()):
            if _is_video_or_frames(item):
                samples.append(Sample(id=f"{cls}/{item.name}", path=str(item), label=index))
    if not samples:
        raise ValueError(f"{root}: no videos or frame folders found in class folders (root/<class>/<video>)")
    return Dataset(name, samples, classes)


def _read_label_names(path: Path) -> list[str]:
    """Class names from a JSON list, a JSON ``{name: index}`` dict, or a text file with one name a line."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
        return [str(x) for x in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _kinetics(root: Path, split: str | Path | None, labels: str | Path | None) -> Dataset:
    """A list file of ``relative/path.mp4 label_index`` lines (SlowFast style; space or comma), else
    the folder-per-class layout."""
    if split is None:
        return _folder(root, "k400")
    split = Path(split)
    if not split.is_absolute() and not split.exists():
        split = root / split
    samples = []
    for n, line in enumerate(split.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = re.split(r"[,\s]+", line.strip())
        if len(parts) < 2 or not parts[-1].lstrip("-").isdigit():
            raise ValueError(f"{split}:{n}: expected 'relative/path.mp4 label_index', got {line!r}")
        rel, label = " ".join(parts[:-1]), int(parts[-1])
        samples.append(Sample(id=rel, path=str(root / rel), label=label))
    classes = _read_label_names(Path(labels)) if labels else None
    return Dataset("k400", samples, classes)


def _ssv2(root: Path, split: str | Path | None, labels: str | Path | None) -> Dataset:
    """Official ``labels.json`` ({template: index}) and ``validation.json`` ([{id, template, ...}]), videos
    at ``root/<id>.webm`` (or under ``20bn-something-something-v2/``), or frame folders ``root/<id>/``."""
    labels_path = Path(labels) if labels else root / "labels.json"
    split_path = Path(split) if split else root / "validation.json"
    for path, what in ((labels_path, "labels.json"), (split_path, "validation.json")):
        if not path.exists():
            raise FileNotFoundError(f"Something-Something v2 needs {what}: {path} does not exist")
    index = {name: int(i) for name, i in json.loads(labels_path.read_text()).items()}
    samples = []
    for entry in json.loads(split_path.read_text()):
        template = entry.get("template", entry.get("label", "")).replace("[", "").replace("]", "")
        if template not in index:
            raise ValueError(f"{split_path}: video {entry.get('id')} has template {template!r}, not in {labels_path}")
        vid = str(entry["id"])
        candidates = [root / f"{vid}.webm", root / "20bn-something-something-v2" / f"{vid}.webm", root / vid]
        path = next((c for c in candidates if c.exists()), candidates[0])
        samples.append(Sample(id=vid, path=str(path), label=index[template]))
    return Dataset("ssv2", samples, _read_label_names(labels_path), sampling="segment")


def _epic(root: Path, split: str | Path | None) -> Dataset:
    """The official validation CSV (``participant_id, video_id, start_frame, stop_frame, verb_class,
    noun_class``; ``narration_id`` used as id when present) over ``root/PXX/PXX_YY/frame_0000000001.jpg``
    frame folders (``root/PXX/rgb_frames/PXX_YY/`` also accepted)."""
    split_path = Path(split) if split else root / "EPIC_100_validation.csv"
    if not split_path.exists():
        raise FileNotFoundError(f"EPIC-KITCHENS-100 needs its annotation CSV: {split_path} does not exist")
    samples = []
    with split_path.open(newline="") as f:
        reader = csv.DictReader(f)
        needed = {"participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{split_path}: missing columns {', '.join(sorted(missing))}")
        for row in reader:
            pid, vid = row["participant_id"], row["video_id"]
            folder = root / pid / vid
            if not folder.exists() and (root / pid / "rgb_frames" / vid).exists():
                folder = root / pid / "rgb_frames" / vid
            start, stop = int(row["start_frame"]), int(row["stop_frame"])
            sid = row.get("narration_id") or f"{vid}_{start}_{stop}"
            samples.append(
                Sample(
                    id=sid,
                    path=str(folder),
                    verb=int(row["verb_class"]),
                    noun=int(row["noun_class"]),
                    start=start,
                    stop=stop,
                )
            )
    return Dataset("epic", samples, None, sampling="segment")

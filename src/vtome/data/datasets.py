"""Dataset layouts -> lists of samples: Kinetics-400, Something-Something v2, EPIC-KITCHENS-100, and any
folder-per-class tree. Each sample is a video file or a folder of frames, with its label(s).

Every file is checked as it is read: a malformed line, entry or label is a ``DatasetError`` naming the
file and line (or entry). Folder datasets take class indices from the model's ``label2id`` when the folder
names match its labels; otherwise they number classes by sorted folder name and say so.
"""

from __future__ import annotations

import csv
import json
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vtome.data.video import FRAME_EXTS, VIDEO_EXTS

DATASETS = ("k400", "ssv2", "epic", "folder")


class DatasetError(ValueError):
    """A dataset file or layout that cannot be used; the message names the file and line or entry."""


@dataclass(frozen=True)
class Sample:
    """One video: ``path`` (a file or a frame folder), its class ``label`` (or ``verb``/``noun`` for
    EPIC-KITCHENS), for EPIC the 1-based frame range ``start``..``stop`` of the action, and ``where`` its
    label came from (``file:line``, for error messages)."""

    id: str
    path: str
    label: int | None = None
    verb: int | None = None
    noun: int | None = None
    start: int | None = None
    stop: int | None = None
    where: str | None = field(default=None, compare=False)


@dataclass
class Dataset:
    name: str
    samples: list[Sample]
    classes: list[str] | None = None  # index -> name, when known
    sampling: str = "dense"  # default frame sampling: dense (K400-style) or segment (SSv2/EPIC-style)
    label_source: str = "split file"  # where class indices come from
    notes: list[str] = field(default_factory=list)  # what the user should know before evaluating
    files: list[Path] = field(default_factory=list)  # the annotation files read (for the run manifest)


def read_dataset(
    kind: str,
    root: str | Path,
    split: str | Path | None = None,
    labels: str | Path | None = None,
    label2id: Mapping[str, int] | None = None,
) -> Dataset:
    """Read a dataset of ``kind`` (k400, ssv2, epic, folder) under ``root``; see the README for layouts.

    ``label2id`` (the model's) numbers the classes of folder-per-class layouts when the names match.
    """
    root = Path(root)
    if kind not in DATASETS:
        raise DatasetError(f"--dataset must be one of {', '.join(DATASETS)}; got {kind!r}")
    if not root.is_dir():
        what = "is a file" if root.is_file() else "does not exist"
        raise FileNotFoundError(f"dataset root {root} is not a directory (it {what}); check --root")
    unused = {
        "folder": [("--split", split), ("--labels", labels)],
        "epic": [("--labels", labels)],
        "k400": [("--labels", labels)] if split is None else [],
    }.get(kind, [])
    for flag, value in unused:
        if value is not None:
            raise DatasetError(f"{flag} {value} has no effect with --dataset {kind}: {_UNUSED[kind, flag]}")
    if kind == "k400":
        data = _kinetics(root, split, labels, label2id)
    elif kind == "ssv2":
        data = _ssv2(root, split, labels)
    elif kind == "epic":
        data = _epic(root, split)
    else:
        data = _folder(root, "folder", label2id)
    _check_present(data, root)
    return data


_UNUSED = {
    ("folder", "--split"): "a folder dataset lists root/<class>/<video>; to evaluate the videos of a list file, "
    "use --dataset k400 --split FILE",
    ("folder", "--labels"): "class names are the folder names; to name classes from a file, use --dataset k400 "
    "--split FILE --labels FILE",
    ("epic", "--labels"): "EPIC-KITCHENS classes are the verb_class and noun_class indices of the annotation CSV",
    ("k400", "--labels"): "without --split the classes are the folder names; pass --split FILE as well to name the "
    "classes of a list file",
}


def _check_present(data: Dataset, root: Path) -> None:
    """Missing videos are recorded as failed when evaluated; all missing means a wrong ``--root``."""
    missing = [s for s in data.samples if not Path(s.path).exists()]
    if missing and len(missing) == len(data.samples):
        raise DatasetError(
            f"none of the {len(missing)} videos listed exists under {root} (first: {missing[0].path}); "
            "check --root (and --split)"
        )
    if missing:
        data.notes.append(
            f"{len(missing)} of {len(data.samples)} listed videos do not exist under {root} (first: "
            f"{missing[0].path}); they will be recorded as failed"
        )


def _is_video_or_frames(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in VIDEO_EXTS
    return path.is_dir() and any(p.suffix.lower() in FRAME_EXTS for p in path.iterdir())


def _norm(name: str) -> str:
    """Class-name key that ignores case and separators: ``Playing_cards`` == ``playing cards``."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())


def _generic(label2id: Mapping[str, int]) -> bool:
    return all(re.fullmatch(r"LABEL_\d+", str(name)) for name in label2id)


def match_labels(folders: list[str], label2id: Mapping[str, int]) -> tuple[dict[str, int], list[str]]:
    """Folder names -> the model's class indices (exact name first, then ignoring case and separators),
    and the folders that match no label."""
    exact = {str(k): int(v) for k, v in label2id.items()}
    keyed: dict[str, set[int]] = {}
    for name, index in exact.items():
        keyed.setdefault(_norm(name), set()).add(index)
    found, unmatched = {}, []
    for folder in folders:
        if folder in exact:
            found[folder] = exact[folder]
        elif len(keyed.get(_norm(folder), ())) == 1:
            found[folder] = next(iter(keyed[_norm(folder)]))
        else:
            unmatched.append(folder)
    return found, unmatched


def _folder(root: Path, name: str, label2id: Mapping[str, int] | None = None) -> Dataset:
    """``root/<class name>/<video file or frame folder>``; class indices from ``label2id`` when every folder
    name matches one of its labels, else by sorted folder name (with a note saying so)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = {cls: [p for p in sorted((root / cls).iterdir()) if _is_video_or_frames(p)] for cls in folders}
    folders = [cls for cls in folders if items[cls]]
    if not folders:
        raise DatasetError(
            f"{root}: no videos ({', '.join(VIDEO_EXTS)}) or frame folders found in class folders "
            "(expected root/<class name>/<video>)"
        )
    notes = []
    index = {cls: i for i, cls in enumerate(folders)}
    classes: list[str] = list(folders)
    source = "sorted folder names"
    if label2id and not _generic(label2id):
        found, unmatched = match_labels(folders, label2id)
        if found and unmatched:
            examples = ", ".join(sorted(label2id)[:5])
            raise DatasetError(
                f"{root}: {len(found)} class folders are named after the model's labels but {len(unmatched)} are "
                f"not: {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}. Rename them after the "
                f"model's labels (e.g. {examples}), or list the videos with their class indices in a --split file"
            )
        if found:
            index, source = found, "model label2id"
            id2label = {int(v): str(k) for k, v in label2id.items()}
            classes = [id2label.get(i, str(i)) for i in range(max(id2label) + 1)]
            dupes = sorted({i for i in found.values() if list(found.values()).count(i) > 1})
            if dupes:
                raise DatasetError(
                    f"{root}: several folders map to the same model class {id2label[dupes[0]]!r}: "
                    + ", ".join(f for f, i in found.items() if i == dupes[0])
                )
    if source == "sorted folder names":
        why = (
            "the model has no class names (only LABEL_0, LABEL_1, ...)"
            if label2id and _generic(label2id)
            else "the folder names do not match the model's labels"
            if label2id
            else "no model labels were given"
        )
        mapping = ", ".join(f"{i}={cls}" for cls, i in list(index.items())[:8])
        notes.append(
            f"{root}: {why}, so classes are numbered by sorted folder name ({mapping}"
            f"{', ...' if len(index) > 8 else ''}). Accuracy is right only if the model was trained with this "
            "order; otherwise name the folders after the model's labels or use a --split file"
        )
    samples = [
        Sample(id=f"{cls}/{item.name}", path=str(item), label=index[cls], where=f"{root / cls}")
        for cls in folders
        for item in items[cls]
    ]
    return Dataset(name, samples, classes, label_source=source, notes=notes)


def _json(path: Path, what: str) -> object:
    try:
        return json.loads(_text(path, what))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}:{err.colno}: {what} is not valid JSON ({err.msg})") from None


def _text(path: Path, what: str) -> str:
    """The file as text, line ends as they are: UTF-8, a leading byte order mark dropped."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: {what} is not a UTF-8 text file") from None


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of a text file, split at ``\\n`` only (a ``\\r`` before it is dropped); a line
    holding any other control or invisible character (a BOM past the start, a stray ``\\r``, U+2028, ...) is
    a ``DatasetError``: such a character would become part of a path or name without being seen."""
    lines = []
    for n, line in enumerate(_text(path, what).split("\n"), 1):
        line = line.removesuffix("\r")
        bad = next((c for c in line if c != "\t" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
        if bad is not None:
            raise DatasetError(
                f"{path}:{n}: holds the invisible character U+{ord(bad):04X} "
                f"({unicodedata.name(bad, 'control character')}); remove it"
            )
        lines.append((n, line))
    return lines


def _json_entries(path: Path, what: str) -> list[tuple[int, object]]:
    """A JSON file holding a list -> ``(line, entry)`` for each element (line numbers for error messages)."""
    data = _json(path, what)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of {{id, template}} objects, got a {type(data).__name__}")
    text, decoder = _text(path, what), json.JSONDecoder()
    pos, entries = text.index("[") + 1, []
    for entry in data:
        pos = re.compile(r"[\s,]*").match(text, pos).end()
        entries.append((text.count("\n", 0, pos) + 1, entry))
        pos = decoder.raw_decode(text, pos)[1]
    return entries


def _read_label_names(path: Path) -> list[str]:
    """Class names from a JSON list, a JSON ``{name: index}`` dict, or a text file with one name a line."""
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist; check --labels")
    if path.suffix.lower() == ".json":
        data = _json(path, "the labels file")
        if isinstance(data, dict):
            index = _label_index(data, path)
            names = {i: name for name, i in index.items()}
            if sorted(names) != list(range(len(names))):
                gaps = sorted(set(range(max(names) + 1)) - set(names))[:5]
                raise DatasetError(f"{path}: class indices must run 0..{len(names) - 1}; missing {gaps}")
            return [names[i] for i in range(len(names))]
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            twice = next((x for i, x in enumerate(data) if x in data[:i]), None)
            if twice is not None:
                raise DatasetError(f"{path}: class name {twice!r} is listed twice")
            return list(data)
        raise DatasetError(f"{path}: expected a JSON list of class names or a {{name: index}} object")
    names: list[str] = []
    first: dict[str, int] = {}
    blank = None
    for n, line in _lines(path, "the labels file"):
        name = line.strip()
        if not name:
            blank = blank or n
            continue
        if blank is not None:
            raise DatasetError(
                f"{path}:{blank}: blank line before the last class name; line k names class k-1, so a blank line "
                "would shift every class after it. Remove it"
            )
        if name in first:
            raise DatasetError(f"{path}:{n}: class name {name!r} is listed twice (first at line {first[name]})")
        first[name] = n
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: no class names; expected one name a line (line k names class k-1)")
    return names


def _label_index(data: dict, path: Path) -> dict[str, int]:
    """``{name: index}`` with integer indices >= 0 (JSON strings of digits accepted, as SSv2 has them)."""
    index: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name, value in data.items():
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
            raise DatasetError(f"{_where(path, name)}: class {name!r} has index {value!r}; expected an integer >= 0")
        index[name] = int(value)
        if int(value) in owner:
            raise DatasetError(f"{_where(path, name)}: classes {owner[int(value)]!r} and {name!r} share index {value}")
        owner[int(value)] = name
    return index


def _where(path: Path, key: str) -> str:
    """``file:line`` of the first line holding the JSON key ``key`` (``file`` if it is not found)."""
    text = _text(path, "the labels file")
    at = text.find(json.dumps(key))
    if at < 0:
        at = text.find(json.dumps(key, ensure_ascii=False))
    return f"{path}:{text.count(chr(10), 0, at) + 1}" if at >= 0 else str(path)


def _split_path(root: Path, split: str | Path, what: str) -> Path:
    """``split`` as given, else under ``root``; ``DatasetError`` if both exist and are different files."""
    path = Path(split)
    if not path.is_absolute():
        here, there = path, root / path
        if here.exists() and there.exists() and not os.path.samefile(here, there):
            raise DatasetError(
                f"{what} {split} is ambiguous: both {here.resolve()} and {there} exist; pass the one you mean "
                "as an absolute path"
            )
        path = here if here.exists() else there
    if path.is_dir():
        raise DatasetError(f"{what} {split} is a folder; --split takes a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {split} does not exist (looked in . and in {root}); check --split")
    return path


_LABEL = re.compile(r"(?P<sep>[\s,]+)(?P<label>[+-]?\d+)\s*$")


def split_line(line: str, where: str) -> tuple[str, int]:
    """One split-file line -> ``(relative path, label)``. The label is the last field, an integer after a run
    of spaces, tabs or commas; the path is everything before that run, exactly as written (runs of spaces,
    commas, quotes inside it are part of the name), with whitespace at the line's start dropped. A path
    in double quotes (``"a b.mp4" 3``; ``""`` for a quote inside) is the text between them. A line whose
    unquoted path ends in a separated number (``a.mp4 300 2``, ``path frames label``) is ambiguous and
    refused: quote the path if its name really ends that way."""
    expected = "expected 'relative/path.mp4 label_index' (label: the last field)"
    text = line.strip(" \t")
    if text.startswith('"'):
        end = 1
        while True:
            end = text.find('"', end)
            if end < 0:
                raise DatasetError(f"{where}: the path's opening quote is never closed; {expected}, got {line!r}")
            if text[end + 1 : end + 2] != '"':
                break
            end += 2
        rel, rest = text[1:end].replace('""', '"'), text[end + 1 :]
        label = re.fullmatch(r"[\s,]+(?P<label>[+-]?\d+)\s*", rest)
        if label is None or not rel:
            raise DatasetError(f"{where}: {expected} after the quoted path, got {line!r}")
        value = int(label["label"])
    else:
        found = _LABEL.search(text)
        if found is None or found.start() == 0:
            raise DatasetError(f"{where}: {expected}, got {line!r}")
        rel, value = text[: found.start()], int(found["label"])
        if re.search(r"[\s,][+-]?\d+$", rel):
            raise DatasetError(
                f"{where}: ambiguous line {line!r}: the path ends in a separated number too (is it 'path frames "
                "label'?). Expected 'relative/path.mp4 label_index'; if the file name really ends that way, put "
                'the path in double quotes ("name 300" 2)'
            )
    if value < 0:
        raise DatasetError(f"{where}: label {value} is negative; class indices start at 0")
    return rel, value


def _kinetics(
    root: Path, split: str | Path | None, labels: str | Path | None, label2id: Mapping[str, int] | None
) -> Dataset:
    """A list file of ``relative/path.mp4 label_index`` lines (see :func:`split_line`), else the
    folder-per-class layout."""
    if split is None:
        return _folder(root, "k400", label2id)
    split = _split_path(root, split, "split file")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for n, line in _lines(split, "the split file"):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rel, label = split_line(line, f"{split}:{n}")
        key = os.path.normpath(rel)
        if key in seen:
            raise DatasetError(f"{split}:{n}: {rel} is listed twice (first at line {seen[key]})")
        seen[key] = n
        samples.append(Sample(id=rel, path=str(root / rel), label=label, where=f"{split}:{n}"))
    if not samples:
        raise DatasetError(f"{split}: no videos listed; expected 'relative/path.mp4 label_index' lines")
    classes = _read_label_names(Path(labels)) if labels else None
    files = [split] + ([Path(labels)] if labels else [])
    return Dataset("k400", samples, classes, files=files)


def _ssv2(root: Path, split: str | Path | None, labels: str | Path | None) -> Dataset:
    """Official ``labels.json`` ({template: index}) and ``validation.json`` ([{id, template, ...}]), videos
    at ``root/<id>.webm`` (or under ``20bn-something-something-v2/``), or frame folders ``root/<id>/``."""
    labels_path = Path(labels) if labels else root / "labels.json"
    split_path = _split_path(root, split, "validation.json") if split else root / "validation.json"
    for path, what, flag in ((labels_path, "labels.json", "--labels"), (split_path, "validation.json", "--split")):
        if not path.is_file():
            raise FileNotFoundError(f"Something-Something v2 needs {what}: {path} does not exist; check {flag}")
    raw = _json(labels_path, "labels.json")
    if not isinstance(raw, dict):
        raise DatasetError(f"{labels_path}: expected a JSON object {{template: index}}, got a {type(raw).__name__}")
    index = _label_index(raw, labels_path)
    samples = []
    seen: set[str] = set()
    for line, entry in _json_entries(split_path, "validation.json"):
        where = f"{split_path}:{line}"
        if not isinstance(entry, dict) or "id" not in entry or not ("template" in entry or "label" in entry):
            raise DatasetError(f"{where}: expected an object with 'id' and 'template'; got {str(entry)[:80]}")
        text = entry.get("template", entry.get("label"))
        if not isinstance(text, str):
            raise DatasetError(f"{where} (id {entry['id']}): 'template' must be a string; got {text!r}")
        template = text.replace("[", "").replace("]", "")
        if template not in index:
            raise DatasetError(f"{where}: video {entry.get('id')} has template {template!r}, not in {labels_path}")
        vid = str(entry["id"])
        if vid in seen:
            raise DatasetError(f"{where}: video id {vid} is listed twice")
        seen.add(vid)
        candidates = [root / f"{vid}.webm", root / "20bn-something-something-v2" / f"{vid}.webm", root / vid]
        path = next((c for c in candidates if c.exists()), candidates[0])
        samples.append(Sample(id=vid, path=str(path), label=index[template], where=where))
    if not samples:
        raise DatasetError(f"{split_path}: no videos listed")
    names = {i: name for name, i in index.items()}
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)]
    return Dataset("ssv2", samples, classes, sampling="segment", files=[labels_path, split_path])


def _epic(root: Path, split: str | Path | None) -> Dataset:
    """The official validation CSV (``participant_id, video_id, start_frame, stop_frame, verb_class,
    noun_class``; ``narration_id`` used as id when present) over ``root/PXX/PXX_YY/frame_0000000001.jpg``
    frame folders (``root/PXX/rgb_frames/PXX_YY/`` also accepted)."""
    split_path = _split_path(root, split, "annotation CSV") if split else root / "EPIC_100_validation.csv"
    if not split_path.is_file():
        raise FileNotFoundError(
            f"EPIC-KITCHENS-100 needs its annotation CSV: {split_path} does not exist; pass it with --split"
        )
    samples = []
    seen: dict[str, int] = {}
    with split_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        needed = {"participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class"}
        try:
            missing = needed - set(reader.fieldnames or [])
        except (UnicodeDecodeError, csv.Error) as err:
            raise DatasetError(f"{split_path}:1: not a CSV file ({err})") from None
        if missing:
            raise DatasetError(f"{split_path}:1: missing columns {', '.join(sorted(missing))}")
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except (UnicodeDecodeError, csv.Error) as err:
            raise DatasetError(f"{split_path}:{reader.line_num + 1}: not readable as CSV ({err})") from None
    for line, row in rows:
        where = f"{split_path}:{line}"
        values = {}
        for key in ("start_frame", "stop_frame", "verb_class", "noun_class"):
            text = (row.get(key) or "").strip()
            if not re.fullmatch(r"-?\d+", text):
                raise DatasetError(f"{where}: {key} must be an integer; got {text!r}")
            values[key] = int(text)
        start, stop = values["start_frame"], values["stop_frame"]
        if start < 1 or stop < start:
            raise DatasetError(f"{where}: frames must satisfy 1 <= start_frame <= stop_frame; got {start}..{stop}")
        for key in ("verb_class", "noun_class"):
            if values[key] < 0:
                raise DatasetError(f"{where}: {key} {values[key]} is negative; class indices start at 0")
        pid, vid = (row.get("participant_id") or "").strip(), (row.get("video_id") or "").strip()
        if not pid or not vid:
            raise DatasetError(f"{where}: participant_id and video_id must not be empty")
        folder = root / pid / vid
        if not folder.exists() and (root / pid / "rgb_frames" / vid).exists():
            folder = root / pid / "rgb_frames" / vid
        sid = (row.get("narration_id") or "").strip() or f"{vid}_{start}_{stop}"
        if sid in seen:
            raise DatasetError(f"{where}: action {sid} is listed twice (first at line {seen[sid]})")
        seen[sid] = line
        samples.append(
            Sample(
                id=sid,
                path=str(folder),
                verb=values["verb_class"],
                noun=values["noun_class"],
                start=start,
                stop=stop,
                where=where,
            )
        )
    if not samples:
        raise DatasetError(f"{split_path}: no actions listed")
    return Dataset("epic", samples, None, sampling="segment", files=[split_path])

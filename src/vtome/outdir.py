"""A results folder (``vtome eval --out``): its lock, its manifest, its prediction files and its timings.

- **Lock.** One writer at a time: the process that owns a run holds an exclusive ``flock`` on
  ``OUT/.vtome.lock`` for the whole run (the kernel drops it when the process dies, even by SIGKILL, so
  a killed run never leaves a stale lock). A second run on the same folder is refused, naming the holder.
- **Manifest.** ``OUT/manifest.json`` records everything that determines a prediction (``settings``:
  model identity, merge settings, frames, sampling, views, crop, dataset files) plus facts for people
  (``about``). A run into a folder that holds predictions compares settings and refuses on any difference,
  naming each one.
- **Predictions.** JSON lines, appended as they are made. A torn last line (an interrupted write) is
  repaired before resuming: kept if it is a whole record, else cut off (its video is evaluated again).
- **Timing.** Each process keeps its measured model time in ``OUT/timing.rank<k>.json`` while it runs;
  these are folded into ``OUT/timing.json`` (one entry per session), so a re-run keeps measured speed.
  The first forward of each session is a warm-up and is not timed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from pathlib import Path

MANIFEST, LOCK, TIMING = "manifest.json", ".vtome.lock", "timing.json"
FORMAT = 1


class OutputError(ValueError):
    """The results folder cannot be used as asked; the message says why and what to do."""


class ReportedByRankZero(OutputError):
    """Process 0's error, raised on the other processes of a ``torchrun`` job (process 0 reports it)."""


def prediction_files(out: Path) -> list[Path]:
    """The merged file first, then per-process files (newer records win when read in this order)."""
    merged = out / "predictions.jsonl"
    return ([merged] if merged.exists() else []) + sorted(out.glob("predictions.rank*.jsonl"))


def prepare(out: Path, flag: str = "--out") -> None:
    """Create ``out`` (and parents); ``OutputError`` if that or writing into it is impossible."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a folder; choose a folder name")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".vtome-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OutputError(
            f"cannot write to {flag} {out}: {err.strerror or err}; choose a folder you can write to"
        ) from None


def write_error(path: Path, err: OSError) -> OutputError:
    """The error to raise when writing ``path`` failed (disk full, permissions, ...)."""
    return OutputError(
        f"cannot write {path}: {err.strerror or err}. Predictions finished so far are kept; fix this "
        "(e.g. free disk space) and run the same command again to resume"
    )


class RunLock:
    """Exclusive lock on a results folder for the life of a run (``with RunLock(out, "eval"):``)."""

    def __init__(self, folder: Path, what: str = "eval") -> None:
        self.path, self.what, self._file = Path(folder) / LOCK, what, None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            f = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        except OSError as err:
            raise write_error(self.path, err) from None
        try:
            _lock(f)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                info = json.loads(holder)
                who = f"{info.get('command', 'vtome')} (pid {info.get('pid')} on {info.get('host')}"
                who += f", since {info.get('since')})"
            except (json.JSONDecodeError, AttributeError):
                who = "another vtome process"
            raise OutputError(
                f"{self.path.parent} is in use by {who}: two runs writing one folder would mix their results. "
                "Wait for it to finish, or use another --out"
            ) from None
        f.seek(0)
        f.truncate()
        command = self.what
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": command,
                }
            )
        )
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def _lock(f: object) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- manifest ---------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """Short SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        items: dict[str, object] = {}
        for key, value in tree.items():
            items.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: tree}


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "..."


def differences(before: dict, now: dict) -> list[str]:
    """Settings that differ between two manifests' ``settings``, one line each (``key: X then, Y now``).

    When both runs left the model unpatched, merge settings do not matter and are not compared.
    """
    a, b = _flat(json.loads(json.dumps(before))), _flat(json.loads(json.dumps(now)))
    unpatched = a.get("merge.patched") is False and b.get("merge.patched") is False
    lines = []
    for key in sorted(set(a) | set(b)):
        if unpatched and key.startswith("merge.") and key != "merge.patched":
            continue
        if a.get(key, "<not set>") != b.get(key, "<not set>"):
            hint = " (other weights or config; built-in names without weights are random at every load)"
            hint = hint if key.endswith("fingerprint") else ""
            lines.append(f"{key}: {_short(a.get(key, '<not set>'))} then, {_short(b.get(key, '<not set>'))} now{hint}")
    return lines


def check_manifest(out: Path, manifest: dict) -> None:
    """Write ``manifest`` into a folder without predictions; in one with predictions, require that they
    were made with the same settings (``OutputError`` naming every difference otherwise)."""
    path = out / MANIFEST
    have_results = bool(prediction_files(out))
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            if have_results:
                raise OutputError(
                    f"{path} is damaged, so the settings of the predictions in {out} are unknown; "
                    f"use another --out, or delete {out} to start over"
                ) from None
            old = None
    if have_results and old is None:
        raise OutputError(
            f"{out} holds predictions but no {MANIFEST} (written by an older vtome or by hand), so the settings "
            f"they were made with are unknown; use another --out, or move the old predictions away to start over"
        )
    if have_results:
        if old.get("format", FORMAT) > FORMAT:
            raise OutputError(f"{path} was written by a newer vtome (format {old['format']}); upgrade vtome")
        diff = differences(old["settings"], manifest["settings"])
        if diff:
            was = old.get("about", {}).get("command")
            raise OutputError(
                f"{out} holds predictions made with different settings, which this run would mix with its own:\n  "
                + "\n  ".join(diff)
                + (f"\n(they came from: {was})" if was else "")
                + f"\nUse another --out for these settings, or delete {out} to start over with them"
            )
        return
    try:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(path)
    except OSError as err:
        raise write_error(path, err) from None


# -- predictions ------------------------------------------------------------------------------------


def repair_predictions(out: Path) -> list[str]:
    """Repair torn last lines of the prediction files (a whole record without its newline is kept; a
    partial one is cut off); a malformed line elsewhere is an ``OutputError`` naming file and line.
    Returns notes on what was repaired."""
    notes = []
    for path in prediction_files(out):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            try:
                record = json.loads(tail)
                whole = isinstance(record, dict) and "id" in record
            except (ValueError, UnicodeDecodeError):
                whole = False
            try:
                if whole:
                    with open(path, "ab") as f:
                        f.write(b"\n")
                else:
                    os.truncate(path, cut)
                    notes.append(
                        f"{path}: cut off a torn last line (an interrupted write, {len(tail)} bytes); "
                        "its video is evaluated again"
                    )
            except OSError as err:
                raise write_error(path, err) from None
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and isinstance(record.get("id"), str)
            except ValueError:
                ok = False
            if not ok:
                raise OutputError(
                    f"{path}:{n}: not a prediction record ({line[:60]!r}); delete that line (its video is "
                    "then evaluated again) and run the same command again"
                )
    return notes


def read_records(out: Path) -> dict[str, dict]:
    """All prediction records under ``out`` by video id (a later record of an id replaces an earlier one)."""
    done: dict[str, dict] = {}
    for path in prediction_files(out):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record:
                done[record["id"]] = record
    return done


# -- timing -----------------------------------------------------------------------------------------


def write_timing(out: Path, rank: int, clips: int, seconds: float) -> None:
    """This process's measured model time so far in the current session."""
    path = out / f"timing.rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"clips": clips, "seconds": seconds, "warm": True}))
        tmp.replace(path)
    except OSError as err:
        raise write_error(path, err) from None


def fold_timing(out: Path) -> None:
    """Fold the per-process timing files of a session (finished or killed) into ``timing.json``:
    clips summed, seconds the slowest process's."""
    parts = sorted(out.glob("timing.rank*.json"))
    if not parts:
        return
    clips, seconds, warm = 0, 0.0, True
    for part in parts:
        try:
            t = json.loads(part.read_text())
            clips, seconds = clips + int(t["clips"]), max(seconds, float(t["seconds"]))
            warm = warm and t.get("warm") is True
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    sessions = read_timing(out)
    if clips and seconds > 0 and warm:
        sessions.append({"clips": clips, "seconds": seconds, "processes": len(parts), "warm": True})
    path = out / TIMING
    try:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(sessions, indent=1) + "\n")
        tmp.replace(path)
        for part in parts:
            part.unlink()
    except OSError as err:
        raise write_error(path, err) from None


def read_timing(out: Path) -> list[dict]:
    """The timed sessions of ``out``: only those measured after a warm-up forward (older vtome versions
    timed the first forward too, whose one-time costs are not the model's speed)."""
    try:
        sessions = json.loads((out / TIMING).read_text())
        return [
            s
            for s in sessions
            if isinstance(s, dict)
            and s.get("warm") is True
            and isinstance(s.get("seconds"), (int, float))
            and math.isfinite(s["seconds"])
            and s["seconds"] > 0
            and isinstance(s.get("clips"), int)
            and s["clips"] > 0
        ]
    except (OSError, ValueError, TypeError):
        return []


def throughput(out: Path) -> tuple[float | None, int]:
    """Clips per second of model time over every session in ``out``, and the clips timed."""
    sessions = read_timing(out)
    clips = sum(int(s["clips"]) for s in sessions)
    seconds = sum(float(s["seconds"]) for s in sessions)
    return (clips / seconds if seconds > 0 else None), clips

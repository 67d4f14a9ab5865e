"""Reading frames: video files through PyAV, and folders of image frames; frame-index sampling.

Only the frames that are sampled are converted and kept: a video is demuxed once to count its frames
(no decoding), then decoded up to its last sampled frame, so memory does not grow with its length.
Rotation metadata is applied; 16-bit and palette images are converted to 8-bit RGB properly; files that
are not a video container (random bytes that FFmpeg would guess to be a raw stream) are rejected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
FRAME_EXTS = (".jpg", ".jpeg", ".png")
# FFmpeg demuxers of real containers. Anything else (raw h263/h264/m4v elementary streams, "tty" text,
# image2) is what FFmpeg guesses for bytes that are not a video file, and decodes into made-up frames.
CONTAINERS = frozenset(
    {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "ogg", "asf", "gif"}
    | {"nut", "mxf", "dv", "wtv"}
)


class VideoReadError(ValueError):
    """A video file or frame folder that cannot be read; the message names the file and the reason."""


def _open(path: Path) -> object:
    """An open PyAV container with a checked video stream (``VideoReadError`` otherwise)."""
    import av

    if not path.is_file():
        raise VideoReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file")
    try:
        container = av.open(str(path))
    except Exception as err:  # noqa: BLE001 - PyAV raises many error types for unreadable input
        raise VideoReadError(f"{path}: not a readable video ({_reason(err)})") from None
    names = set(container.format.name.split(","))
    if not names & CONTAINERS:
        container.close()
        raise VideoReadError(
            f"{path}: not a video file (FFmpeg could only guess it to be raw {container.format.name!r} data; "
            "the file is damaged or not a video)"
        )
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise VideoReadError(f"{path}: no video stream (the file has {', '.join(kinds)} streams only)")
    return container


def _reason(err: BaseException) -> str:
    text = str(err).split(": '")[0] if str(err) else type(err).__name__
    return text.strip() or type(err).__name__


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of a video file's first video stream, by demuxing (no decoding)."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        n = sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as err:  # noqa: BLE001
        raise VideoReadError(f"{path}: damaged video ({_reason(err)})") from None
    finally:
        container.close()
    if n == 0:
        raise VideoReadError(f"{path}: the video stream has no frames")
    return n


def _to_rgb(frame: object) -> np.ndarray:
    """One decoded PyAV frame -> ``[H, W, 3]`` uint8 RGB with the stream's display rotation applied."""
    image = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) / 90) % 4  # counter-clockwise quarter turns for display
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _decode(path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Frames ``wanted`` of a video (decoding stops after the last one) and how many frames were decoded."""
    container = _open(path)
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    n = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for n, frame in enumerate(container.decode(stream), 1):  # noqa: B007 - n is the count after the loop
            if n - 1 in wanted:
                kept[n - 1] = _to_rgb(frame)
            if n - 1 >= last:
                break
    except Exception as err:  # noqa: BLE001
        if not kept or max(kept) < last:
            raise VideoReadError(f"{path}: damaged video, decoding failed after {n} frames ({_reason(err)})") from None
    finally:
        container.close()
    return kept, n


def sample_video(path: str | os.PathLike, pick: Callable[[int], Sequence[int]]) -> np.ndarray:
    """Frames ``pick(total)`` of a video file, ``[len(indices), H, W, 3]`` uint8 RGB, in that order.

    Only the picked frames are kept. If the file decodes fewer frames than its container lists, the
    indices are picked again from the true count.
    """
    path = Path(path)
    total = count_frames(path)
    indices = [int(i) for i in pick(total)]
    kept, decoded = _decode(path, set(indices))
    if len(kept) < len(set(indices)):
        if decoded == 0:
            raise VideoReadError(f"{path}: no frame of the video could be decoded")
        indices = [int(i) for i in pick(decoded)]
        kept, _ = _decode(path, set(indices))
        if len(kept) < len(set(indices)):
            raise VideoReadError(f"{path}: damaged video, frames {sorted(set(indices) - set(kept))} do not decode")
    return np.stack([kept[i] for i in indices])


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as ``[N, H, W, 3]`` uint8 RGB (``VideoReadError`` on unreadable files)."""
    return sample_video(path, lambda total: range(total))


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """Write ``[N, H, W, 3]`` uint8 frames (codec from the extension: mp4 -> h264, webm -> vp9, gif)."""
    import av

    codec = {".webm": "libvpx-vp9", ".gif": "gif"}.get(Path(path).suffix.lower(), "libx264")
    n, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), "rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())


def list_frames(folder: str | os.PathLike) -> list[Path]:
    """Image files of a frame folder, in name order."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_EXTS)
    if not files:
        raise VideoReadError(f"{folder}: no frame images ({', '.join(FRAME_EXTS)})")
    return files


def image_to_rgb(image: object) -> np.ndarray:
    """A PIL image -> ``[H, W, 3]`` uint8 RGB. 16-bit (``I;16*``, and ``I`` as PNG decodes 16-bit grey) is
    scaled from 0..65535 to 0..255, not clipped; palette images take their palette colours."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image).astype(np.int64)
        grey = ((np.clip(grey, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0
        return np.repeat(np.clip(grey * scale, 0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def read_frames(files: list[Path], indices: list[int]) -> np.ndarray:
    """Frames ``indices`` of an ordered list of image files, ``[len(indices), H, W, 3]`` uint8 RGB."""
    from PIL import Image

    cache: dict[int, np.ndarray] = {}
    for i in set(indices):
        try:
            with Image.open(files[i]) as image:
                cache[i] = image_to_rgb(image)
        except FileNotFoundError:
            raise VideoReadError(f"{files[i]}: frame image missing") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise VideoReadError(f"{files[i]}: unreadable frame image ({err})") from None
    shapes = {cache[i].shape for i in cache}
    if len(shapes) > 1:
        raise VideoReadError(f"{files[0].parent}: frame images differ in size ({', '.join(map(str, sorted(shapes)))})")
    return np.stack([cache[i] for i in indices])


def dense_indices(total: int, num_frames: int, rate: int, view: int = 0, views: int = 1) -> list[int]:
    """``num_frames`` frames ``rate`` apart; with several temporal ``views`` their starts spread evenly.

    One view is centred. Clips shorter than the span repeat their last frame.
    """
    if rate < 1:
        raise ValueError(f"the sampling rate (frame stride) must be >= 1; got {rate}")
    span = (num_frames - 1) * rate + 1
    room = max(total - span, 0)
    start = room // 2 if views == 1 else round(room * view / (views - 1))
    return [min(start + i * rate, total - 1) for i in range(num_frames)]


def segment_indices(total: int, num_frames: int, view: int = 0, views: int = 1) -> list[int]:
    """TSN-style: the clip cut into ``num_frames`` equal segments, one frame from each (the middle for
    one view; evenly shifted positions inside the segments for several views)."""
    offset = (view + 0.5) / views
    return [min(int((i + offset) * total / num_frames), total - 1) for i in range(num_frames)]

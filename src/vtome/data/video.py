"""Reading frames: video files through PyAV, and folders of JPEG frames; frame-index sampling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
FRAME_EXTS = (".jpg", ".jpeg", ".png")


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as ``[N, H, W, 3]`` uint8 RGB (PyAV; raises on unreadable files)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames)


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
        raise ValueError(f"{folder}: no frame images ({', '.join(FRAME_EXTS)})")
    return files


def read_frames(files: list[Path], indices: list[int]) -> np.ndarray:
    """Frames ``indices`` of an ordered list of image files, ``[len(indices), H, W, 3]`` uint8 RGB."""
    from PIL import Image

    cache: dict[int, np.ndarray] = {}
    for i in set(indices):
        with Image.open(files[i]) as image:
            cache[i] = np.asarray(image.convert("RGB"))
    return np.stack([cache[i] for i in indices])


def dense_indices(total: int, num_frames: int, rate: int, view: int = 0, views: int = 1) -> list[int]:
    """``num_frames`` frames ``rate`` apart; with several temporal ``views`` their starts spread evenly.

    One view is centred. Clips shorter than the span repeat their last frame.
    """
    span = (num_frames - 1) * rate + 1
    room = max(total - span, 0)
    start = room // 2 if views == 1 else round(room * view / (views - 1))
    return [min(start + i * rate, total - 1) for i in range(num_frames)]


def segment_indices(total: int, num_frames: int, view: int = 0, views: int = 1) -> list[int]:
    """TSN-style: the clip cut into ``num_frames`` equal segments, one frame from each (the middle for
    one view; evenly shifted positions inside the segments for several views)."""
    offset = (view + 0.5) / views
    return [min(int((i + offset) * total / num_frames), total - 1) for i in range(num_frames)]

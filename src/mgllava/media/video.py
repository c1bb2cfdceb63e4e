"""Video decoding: uniform frame sampling with PyAV, as the reference samples (docs/design.md section 8).

    video file --PyAV--> num_frames RGB frames at linspace(0, n-1, num_frames).astype(int)

The number of frames is the image processor's `num_frames` setting (8 in the paper); the per-frame pixel
and box transforms live in `data.video`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class VideoError(ValueError):
    """A video that cannot be used, with the input named and the reason stated."""


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The reference's uniform sampling: `np.linspace(0, total - 1, num_frames, dtype=int)`."""
    if total < 1:
        raise VideoError("video has no frames")
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def _count_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def load_video_frames(path: str | os.PathLike, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames sampled uniformly; raises `VideoError` naming the file for anything unusable."""
    import av

    name = f"video {os.fspath(path)!r}"
    if not Path(path).is_file():
        raise VideoError(f"{name}: no such file")
    try:
        wanted = sample_indices(_count_frames(os.fspath(path)), num_frames)
        picked: dict[int, Image.Image] = {}
        with av.open(os.fspath(path)) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted:
                    picked[index] = frame.to_image().convert("RGB")
                if index >= wanted[-1]:
                    break
    except VideoError as err:
        raise VideoError(f"{name}: {err}") from err
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as err:
        raise VideoError(f"{name}: cannot decode ({type(err).__name__}: {err})") from err
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise VideoError(
            f"{name}: frames {missing} could not be decoded (stream shorter than its header says)"
        )
    return [picked[i] for i in wanted]


def as_frames(video: Any, num_frames: int) -> list[Image.Image]:
    """A path, a list of PIL frames, or a (T, H, W, 3) uint8 array -> list of RGB frames."""
    if isinstance(video, (str, os.PathLike)):
        return load_video_frames(video, num_frames)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise VideoError(f"video arrays must be (T, H, W, 3) uint8, got {video.shape} {video.dtype}")
        return [Image.fromarray(f) for f in video]
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, Image.Image) for f in video):
        return [f.convert("RGB") for f in video]
    raise VideoError(
        f"a video must be a file path, a list of PIL frames or a uint8 array, got {type(video).__name__}"
    )

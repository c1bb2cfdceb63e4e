"""Media decoding, the bottom layer under `boxes` and `data`: any image a user hands us -> upright 8-bit RGB
(`media.images`), a video file or array -> uniformly sampled RGB frames (`media.video`). Errors name the
input (`ImageError`, `ImageTooLarge`, `VideoError`)."""

from .images import DEFAULT_MAX_PIXELS, ImageError, ImageInput, ImageTooLarge, describe, load_image
from .video import VideoError, as_frames, load_video_frames, sample_indices

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageInput",
    "ImageTooLarge",
    "VideoError",
    "as_frames",
    "describe",
    "load_image",
    "load_video_frames",
    "sample_indices",
]

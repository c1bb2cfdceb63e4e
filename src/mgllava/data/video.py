"""Video frames into model tensors and boxes: the reference's per-frame transforms (docs/design.md section 8).

    frames (decoded by `media.video`)
    each frame: /255, CLIP-normalise, short side -> S (bilinear, align_corners=False, long side floored),
                centre crop S x S (offset round((L - S) / 2))    - once with S = 336, once with S = 768
    boxes of a frame (its original pixels): scale by S_hi / short side, round, shift by the crop offset,
                clip, drop, NMS/cap/fallback as for images

Frames are not square-padded (unlike images). Deviation from the reference: its boxes use the crop offset
`(L' - S) // 2` while its pixels use `round((L' - S) / 2)`, which can differ by one pixel; here boxes use the
pixels' own offset.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """pytorchvideo's ShortSideScale output (height, width): the long side is floored."""
    if width < height:
        return math.floor(height / width * size), size
    return size, math.floor(width / height * size)


def crop_offset(length: int, size: int) -> int:
    """torchvision's video centre crop offset."""
    return round((length - size) / 2.0)


def frame_pixels(frames: list[Image.Image], size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Frames -> (T, 3, size, size): normalise, short side to `size`, centre crop (the reference's order)."""
    clip = torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) for f in frames]))  # (T, H, W, 3)
    clip = clip.permute(3, 0, 1, 2) / 255.0  # (3, T, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
    clip = (clip - m) / s
    new_h, new_w = short_side_size(clip.shape[-2], clip.shape[-1], size)
    clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = crop_offset(new_h, size), crop_offset(new_w, size)
    return clip[..., top : top + size, left : left + size].permute(1, 0, 2, 3).contiguous()  # (T, 3, S, S)


def frame_box_transform(width: int, height: int, size: int) -> tuple[float, int, int]:
    """(scale, x offset, y offset) that map a frame's original pixels into its `size` crop."""
    new_h, new_w = short_side_size(height, width, size)
    return size / min(width, height), crop_offset(new_w, size), crop_offset(new_h, size)

"""`MGLlavaImageProcessor`: one image -> the low-res and high-res tensors and the object boxes (docs/design.md section 2).

    image (W x H, any mode) --load_image--> RGB, upright
      --pad to square (fill int(255 * mean), pasted at ((side-W)//2, (side-H)//2))-->  side x side
      --PIL bicubic resize--> S_hi x S_hi --/255, CLIP normalise-->  high_res_pixel_values (3, S_hi, S_hi)
      --bilinear downsample of the normalised tensor (align_corners=False, no antialias)--> pixel_values (3, S_lo, S_lo)
    boxes (original pixels) --validate, shift, NMS, cap, scale/round/clip/drop, fallback--> (n, 4) in S_hi frame

`MGLlavaImageProcessorTorchvision` (transformers' "torchvision" backend, opt-in: `backend="torchvision"`) does
the same steps on uint8 tensors with torchvision's antialiased bicubic resize: about 2x faster on one
thread, within 2 levels of 255 of PIL's per pixel (mean 1e-4 normalised), so not bit-identical to the
reference's pixels. The default stays PIL, for every Auto class too (see `mgllava/__init__.py`).

This is what the reference's training and evaluation do (its HF `CLIPImageProcessor` resized the padded
square to 768 with PIL bicubic); its chat demo resized to 336 and zero-padded instead, a bug we do not copy.
A batch returns `pixel_values` (B, 3, S_lo, S_lo), `high_res_pixel_values` (B, 3, S_hi, S_hi) when the model
has the high-res branch (`use_high_res`), and, when it uses object tokens, `object_boxes` (sum n_i, 4) with
`object_counts` (B,). Without the branch the S_hi image is still made for an image (the low-res tensor is its
downsample, the path models are trained on) but not kept, hashed or sent; video frames skip it altogether
(their low-res frames are resized on their own).

Boxes per image: given (original pixels), `[]` for none, or None for "not given", which here means no boxes.
No detector lives here: `MGLlavaProcessor.proposer` (or the engine's) fills boxes that are not given before
the images reach this processor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BaseImageProcessor, BatchFeature

from ..boxes.select import BoxOptions, FrameMap, prepare_boxes, without_fallback
from ..boxes.types import Boxes
from ..media.images import DEFAULT_MAX_PIXELS, ImageInput, describe, load_image
from ..media.video import as_frames
from .video import frame_box_transform, frame_pixels

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class MGLlavaImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "high_res_pixel_values", "object_boxes", "object_counts"]

    def __init__(
        self,
        low_res_size: int = 336,
        high_res_size: int = 768,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        use_object_tokens: bool = True,
        use_high_res: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        apply_exif: bool = True,
        box_nms_iou: float | None = 0.2,
        box_limit: int | None = 100,
        box_cap: str = "per_label",
        box_per_label: int | None = None,
        box_empty_fallback: bool = True,
        invalid_boxes: str = "drop",
        num_frames: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.low_res_size = int(low_res_size)
        self.high_res_size = int(high_res_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.use_object_tokens = bool(use_object_tokens)
        self.use_high_res = bool(use_high_res)
        self.max_image_pixels = max_image_pixels
        self.apply_exif = bool(apply_exif)
        self.box_nms_iou = box_nms_iou
        self.box_limit = box_limit
        self.box_cap = box_cap
        self.box_per_label = box_per_label
        self.box_empty_fallback = bool(box_empty_fallback)
        self.invalid_boxes = invalid_boxes
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = int(num_frames)  # frames sampled per video (docs/design.md section 8: 8)
        _ = self.box_options  # validates the box settings now rather than at the first image

    @property
    def box_options(self) -> BoxOptions:
        return BoxOptions(
            nms_iou=self.box_nms_iou,
            limit=self.box_limit,
            cap=self.box_cap,
            per_label=self.box_per_label,
            empty_fallback=self.box_empty_fallback,
            invalid=self.invalid_boxes,
        )

    @property
    def fill_color(self) -> tuple[int, int, int]:
        return tuple(int(255 * m) for m in self.image_mean)

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB image -> (low-res (3, S_lo, S_lo), high-res (3, S_hi, S_hi)) float32 tensors."""
        square = expand_to_square(image, self.fill_color)
        resized = square.resize((self.high_res_size, self.high_res_size), Image.BICUBIC)
        arr = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        high = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())  # (3, S_hi, S_hi)
        low = F.interpolate(
            high[None], size=(self.low_res_size, self.low_res_size), mode="bilinear", align_corners=False
        )[0]  # (3, S_lo, S_lo)
        return low, high

    def frame_map(self, width: int, height: int, video: bool = False) -> FrameMap:
        """How a W x H image's pixels map into the high-res frame: square-padded (images) or short side
        scaled and centre-cropped (video frames)."""
        if video:
            return FrameMap.cropped(
                *frame_box_transform(width, height, self.high_res_size), self.high_res_size
            )
        return FrameMap.padded(width, height, self.high_res_size)

    def boxes_for(
        self, boxes: Any, width: int, height: int, name: str = "boxes", video: bool = False
    ) -> Boxes:
        """Boxes in original pixels of a W x H image -> the model's high-res frame (see `boxes.select`)."""
        frame = self.frame_map(width, height, video)
        return prepare_boxes(Boxes.from_any(boxes, (width, height)), frame, self.box_options, name)

    def used_boxes(self, boxes: Any, width: int, height: int, video: bool = False) -> Boxes:
        """The boxes that become object tokens (selected as `boxes_for` selects them, without the zero-box
        fallback), mapped back into the W x H image's pixels: what a user is shown of what the model saw."""
        if boxes is None:
            return Boxes.empty((width, height))
        framed = without_fallback(self.boxes_for(boxes, width, height, video=video))
        return self.frame_map(width, height, video).to_original(framed, (width, height))

    def _batch(
        self, lows: list[torch.Tensor], highs: list[torch.Tensor], framed: list[Boxes]
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"pixel_values": torch.cat(lows)}
        if self.use_high_res:
            data["high_res_pixel_values"] = torch.cat(highs)
        if self.use_object_tokens:
            data["object_boxes"] = torch.cat([b.xyxy for b in framed]) if framed else torch.zeros(0, 4)
            data["object_counts"] = torch.tensor([len(b) for b in framed], dtype=torch.long)
        return data

    def frames(self, video: Any) -> list[Any]:
        """A video (file path, PIL frames or a (T, H, W, 3) uint8 array) -> its `num_frames` RGB frames."""
        return as_frames(video, self.num_frames)

    def video(self, video: Any, boxes: list[Any] | None = None) -> dict[str, Any]:
        """One video -> per-frame tensors (T rows each) and per-frame boxes (`boxes[t]` in frame t's pixels)."""
        frames = self.frames(video)
        if boxes is not None and len(boxes) != len(frames):
            raise ValueError(f"got boxes for {len(boxes)} frames but the video gives {len(frames)} frames")
        low = frame_pixels(frames, self.low_res_size, self.image_mean, self.image_std)
        high = (
            frame_pixels(frames, self.high_res_size, self.image_mean, self.image_std)
            if self.use_high_res
            else None
        )
        framed = []
        if self.use_object_tokens:
            for t, frame in enumerate(frames):
                raw = None if boxes is None else boxes[t]
                framed.append(self.boxes_for(raw, *frame.size, f"boxes of video frame {t}", video=True))
        return self._batch([low], [high] if high is not None else [], framed)

    def preprocess(
        self,
        images: ImageInput | list[ImageInput],
        boxes: Any | list[Any] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        image_list = images if isinstance(images, (list, tuple)) else [images]
        if boxes is None:
            box_list: list[Any] = [None] * len(image_list)
        else:
            box_list = list(boxes) if isinstance(images, (list, tuple)) else [boxes]
        if len(box_list) != len(image_list):
            raise ValueError(f"got {len(image_list)} images but boxes for {len(box_list)}")
        lows, highs, framed = [], [], []
        rgbs = [load_image(image, self.max_image_pixels, self.apply_exif) for image in image_list]
        for image, rgb, image_boxes in zip(image_list, rgbs, box_list, strict=True):
            low, high = self.pixels(rgb)
            lows.append(low[None])
            if self.use_high_res:
                highs.append(high[None])
            if self.use_object_tokens:
                framed.append(self.boxes_for(image_boxes, *rgb.size, name=f"boxes of {describe(image)}"))
        return BatchFeature(data=self._batch(lows, highs, framed), tensor_type=return_tensors)


class MGLlavaImageProcessorTorchvision(MGLlavaImageProcessor):
    """`MGLlavaImageProcessor` with the square padding and 768 px bicubic resize done by torchvision on uint8
    tensors (antialiased, as PIL's resize filters): same steps, same box handling, ~2x faster pixels on one
    thread (bench/bench_image_processor.py), values within 2 levels of 255 of PIL's (tests/data/test_image_processor.py)."""

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF  # only this backend needs torchvision

        rgb = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        height, width = rgb.shape[1:]
        side = max(height, width)
        square = torch.tensor(self.fill_color, dtype=torch.uint8).view(3, 1, 1).repeat(1, side, side)
        top, left = (side - height) // 2, (side - width) // 2  # where expand_to_square pastes
        square[:, top : top + height, left : left + width] = rgb
        size = [self.high_res_size, self.high_res_size]
        resized = TF.resize(square, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        high = TF.normalize(resized.float() / 255.0, self.image_mean, self.image_std)  # (3, S_hi, S_hi)
        low = F.interpolate(
            high[None], size=(self.low_res_size, self.low_res_size), mode="bilinear", align_corners=False
        )[0]  # (3, S_lo, S_lo)
        return low, high

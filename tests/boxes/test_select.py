"""Box selection cases of docs/design.md section 5 not covered in data/test_image_processor.py: the reference's default
trigger (more than 100 boxes -> 20 per label, not a hard cap), the 5-per-label rule below 50, the NMS IoU
threshold, and NMS running on original pixels before the boxes are rounded into the model's frame."""

import numpy as np
import pytest
import torch
from PIL import Image

from mgllava.boxes import Boxes, BoxOptions, select_boxes
from mgllava.data.image_processor import MGLlavaImageProcessor


def spread(counts: dict[str, int]) -> Boxes:
    """Non-overlapping boxes, `counts[label]` of each label, with distinct decreasing scores."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    xy = torch.arange(len(labels), dtype=torch.float32)[:, None] * 20
    boxes = torch.cat([xy, xy, xy + 10, xy + 10], dim=1)
    return Boxes(boxes, torch.linspace(0.99, 0.01, len(labels)), labels)


def test_at_most_100_boxes_are_left_alone():
    boxes = spread({"cat": 70, "dog": 30})
    assert len(select_boxes(boxes)) == 100


def test_more_than_100_boxes_keep_the_top_20_per_label_which_is_not_a_hard_cap():
    boxes = spread({label: 17 for label in "abcdef"} | {"z": 3})  # 105 boxes in 7 labels
    out = select_boxes(boxes)
    assert len(out) == 6 * 17 + 3  # every label has <= 20: nothing goes
    source = spread({label: 30 for label in "abcdefg"})  # 210 boxes
    many = select_boxes(source)
    assert len(many) == 7 * 20 > 100
    assert many.labels == [label for label in "abcdefg" for _ in range(20)]  # grouped, first-appearance order
    assert torch.equal(many.scores[:20], source.scores[:20])  # the top 20 of "a", best first


@pytest.mark.parametrize("limit, per_label", [(49, 5), (50, 5), (51, 20)])
def test_per_label_count_follows_the_limit(limit, per_label):
    out = select_boxes(spread({"a": 40, "b": 40}), BoxOptions(limit=limit))
    assert len(out) == 2 * per_label  # limit 50 is undefined in the reference; we use 5


def pair(shift: float) -> Boxes:
    """Two 10x10 boxes of one label; IoU = (10 - shift) / (10 + shift)."""
    return Boxes([[0, 0, 10, 10], [shift, 0, shift + 10, 10]], [0.9, 0.8], ["cat", "cat"])


def test_nms_iou_threshold_is_0_2():
    assert len(select_boxes(pair(6.8))) == 2  # IoU 0.19: both kept
    assert len(select_boxes(pair(6.4))) == 1  # IoU 0.22: the lower score goes
    assert len(select_boxes(pair(6.4), BoxOptions(nms_iou=None))) == 2


def test_nms_runs_on_original_pixels_before_rounding_into_the_frame():
    # IoU 0.162 in the 640 px image; after the 0.05 scale and rounding it would be 0.222 and one would go
    processor = MGLlavaImageProcessor(low_res_size=14, high_res_size=32)
    image = Image.fromarray(np.zeros((640, 640, 3), dtype=np.uint8))
    boxes = Boxes([[0, 0, 115, 100], [85, 0, 185, 100]], [0.9, 0.8], ["cat", "cat"])
    out = processor(image, boxes=boxes)
    assert out["object_boxes"].tolist() == [[0, 0, 6, 5], [4, 0, 9, 5]]


@pytest.mark.parametrize("seed", range(8))
def test_batched_nms_equals_torchvision(seed):
    """The plain-torch NMS keeps the boxes torchvision's keeps, in the same order (ties, empty boxes and
    several labels included)."""
    from torchvision.ops import batched_nms as tv_batched_nms

    from mgllava.boxes.select import batched_nms

    g = torch.Generator().manual_seed(seed)
    n = 60
    xy = torch.randint(0, 50, (n, 2), generator=g).float()
    wh = torch.randint(0, 30, (n, 2), generator=g).float()  # some zero-width boxes
    xyxy = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randint(0, 10, (n,), generator=g).float() / 10  # many ties
    labels = torch.randint(0, 3, (n,), generator=g)
    for iou in (0.0, 0.2, 0.5):
        assert (
            batched_nms(xyxy, scores, labels, iou).tolist()
            == tv_batched_nms(xyxy, scores, labels, iou).tolist()
        )

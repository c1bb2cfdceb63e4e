"""Image processor: pixels equal the reference pipeline; boxes follow docs/design.md sections 2 and 5; bad images fail clearly."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mgllava.boxes import Boxes
from mgllava.data.image_processor import CLIP_MEAN, MGLlavaImageProcessor
from mgllava.media.images import ImageError, load_image


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def reference_pixels(image, low=336, high=768):
    """The reference: expand2square with int(255*mean) fill, HF CLIPImageProcessor at shortest_edge=crop=768
    (PIL bicubic), then bilinear downsample of the normalised tensor."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    clip = CLIPImageProcessorPil(size={"shortest_edge": high}, crop_size={"height": high, "width": high})
    hi = clip(square, return_tensors="pt")["pixel_values"][0]
    lo = F.interpolate(hi[None], size=[low, low], mode="bilinear", align_corners=False)[0]
    return lo, hi


@pytest.mark.parametrize("size", [(80, 50), (50, 80), (64, 64), (1000, 333)])
def test_pixels_match_reference_pipeline(size):
    image = random_image(*size)
    out = MGLlavaImageProcessor()(image)
    lo, hi = reference_pixels(image)
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert out["high_res_pixel_values"].shape == (1, 3, 768, 768)
    torch.testing.assert_close(out["high_res_pixel_values"][0], hi, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["pixel_values"][0], lo, atol=1e-6, rtol=0)


def test_padding_colour_is_truncated_clip_mean():
    processor = MGLlavaImageProcessor()
    assert processor.fill_color == (122, 116, 104)


def test_boxes_shift_scale_round_clip_drop():
    processor = MGLlavaImageProcessor(box_nms_iou=None)
    image = random_image(400, 200)  # pasted at y offset 100 on a 400 square; scale 768 / 400 = 1.92
    boxes = Boxes(
        [
            [10, 10, 50, 60],
            [390, 150, 420, 230],
            [-30, -5, -10, 40],
            [0.26, 0, 100.26, 0],
            [500, 10, 600, 20],
        ],
        labels=["a", "b", "c", "d", "e"],
    )
    out = processor(image, boxes=boxes)
    # [10,110,50,160]*1.92 = [19.2,211.2,96,307.2] -> round; [390,250,420,330]*1.92 -> clip x2 to 768;
    # [-30,95,-10,140] lies left of the frame -> dropped; zero-height [0.26,100,100.26,100] is kept;
    # x1 = 500*1.92 = 960 > 768 -> dropped
    expected = [[19, 211, 96, 307], [749, 480, 768, 634], [0, 192, 192, 192]]
    assert out["object_boxes"].tolist() == expected
    assert out["object_counts"].tolist() == [3]


def test_round_half_to_even_like_torch_round():
    processor = MGLlavaImageProcessor(low_res_size=14, high_res_size=32, box_nms_iou=None)
    out = processor(random_image(64, 64), boxes=[[1, 3, 5, 7]])  # scale 0.5 -> 0.5, 1.5, 2.5, 3.5
    assert out["object_boxes"].tolist() == [[0, 2, 2, 4]]


def test_nms_is_class_wise_and_cap_is_per_label():
    processor = MGLlavaImageProcessor(box_limit=3)
    boxes = Boxes(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 11],
            [0, 0, 10, 10],
            [50, 50, 60, 60],
            [70, 70, 80, 80],
            [20, 20, 30, 30],
        ],
        scores=[0.9, 0.8, 0.7, 0.6, 0.5, 0.95],
        labels=["cat", "cat", "dog", "cat", "cat", "dog"],
    )
    # NMS (IoU 0.2) removes only the overlapping second "cat"; 5 boxes remain > limit 3, so each label keeps its
    # top 5 (limit < 50): nothing else goes. Order: labels by first appearance after NMS (dog first: 0.95).
    out = processor.boxes_for(boxes, 100, 100)
    assert out.labels == ["dog", "dog", "cat", "cat", "cat"]
    assert out.scores.tolist() == pytest.approx([0.95, 0.7, 0.9, 0.6, 0.5])


def test_per_label_cap_keeps_top_k_in_score_order():
    processor = MGLlavaImageProcessor(box_nms_iou=None, box_limit=2, box_per_label=2)
    boxes = Boxes(
        [[i, i, i + 1, i + 1] for i in range(5)], scores=[0.1, 0.5, 0.3, 0.9, 0.2], labels=["x"] * 4 + ["y"]
    )
    out = processor.boxes_for(boxes, 100, 100)
    assert out.labels == ["x", "x", "y"]  # per label, not a hard cap: 3 > limit 2
    assert out.scores.tolist() == pytest.approx([0.9, 0.5, 0.2])


def test_true_top_k_is_a_hard_cap():
    processor = MGLlavaImageProcessor(box_nms_iou=None, box_limit=2, box_cap="top_k")
    boxes = Boxes([[i, i, i + 1, i + 1] for i in range(5)], scores=[0.1, 0.5, 0.3, 0.9, 0.2])
    assert processor.boxes_for(boxes, 100, 100).scores.tolist() == pytest.approx([0.9, 0.5])


def test_zero_box_fallback_on_and_off():
    image = random_image(40, 40)
    assert MGLlavaImageProcessor()(image)["object_boxes"].tolist() == [[0, 0, 0, 0]]
    off = MGLlavaImageProcessor(box_empty_fallback=False)(image)
    assert off["object_boxes"].shape == (0, 4) and off["object_counts"].tolist() == [0]


def test_invalid_boxes_are_dropped_or_raise():
    boxes = [[0, 0, float("nan"), 5], [0, float("inf"), 5, 5], [10, 10, 5, 20], [1, 1, 9, 9]]
    out = MGLlavaImageProcessor(box_nms_iou=None, low_res_size=14, high_res_size=32)(
        random_image(32, 32), boxes=boxes
    )
    assert out["object_boxes"].tolist() == [[1, 1, 9, 9]]
    with pytest.raises(ValueError, match="3 invalid boxes"):
        MGLlavaImageProcessor(invalid_boxes="raise")(random_image(32, 32), boxes=boxes)


def test_boxes_of_wrong_shape_are_named():
    with pytest.raises(ValueError, match=r"\(n, 4\)|shape"):
        MGLlavaImageProcessor()(random_image(32, 32), boxes=[[1, 2, 3]])


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="box cap"):
        MGLlavaImageProcessor(box_cap="largest")


# -- bad images --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_decodes_to_rgb(mode, tmp_path):
    base = random_image(30, 20)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert image.mode.startswith("I;16")
    else:
        image = base.convert(mode)
    suffix = {"CMYK": ".jpg", "I": ".tiff", "F": ".tiff"}.get(mode, ".png")
    path = tmp_path / f"x{suffix}"
    image.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)
    if mode in ("I;16", "L"):  # 16-bit is scaled onto 8 bits, not clipped
        assert (
            np.abs(np.asarray(rgb)[..., 0].astype(int) - np.asarray(base.convert("L"), dtype=int)).max() <= 1
        )


def test_exif_rotation_is_applied(tmp_path):
    image = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert load_image(path, apply_exif=False).size == (40, 20)


def test_zero_size_and_bombs_and_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ImageError, match="exceeds the limit of 1000000"):
        load_image(big, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="max_image_pixels"):
        MGLlavaImageProcessor(max_image_pixels=1_000_000)(str(big))
    good = io.BytesIO()
    random_image(64, 64).save(good, format="PNG")
    with pytest.raises(ImageError, match=r"cannot decode|not a readable image"):
        load_image(good.getvalue()[:200])
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("size", [(1024, 768), (333, 517), (768, 768), (41, 7)])
def test_torchvision_backend_is_within_2_levels_of_pil_and_takes_the_same_boxes(size):
    from mgllava.data.image_processor import MGLlavaImageProcessorTorchvision

    pil, fast = MGLlavaImageProcessor(), MGLlavaImageProcessorTorchvision()
    image, boxes = random_image(*size, seed=sum(size)), [[[0, 0, size[0] // 2, size[1] // 2]]]
    a, b = pil(image, boxes=boxes), fast(image, boxes=boxes)
    assert a.keys() == b.keys() and torch.equal(a["object_boxes"], b["object_boxes"])
    levels = torch.tensor(pil.image_std).view(3, 1, 1) * 255  # one normalised unit in levels of 255
    for key in ("pixel_values", "high_res_pixel_values"):
        diff = (a[key] - b[key]).abs()
        assert (diff * levels).max() <= 2.001 and diff.mean() < 1e-3, (
            key,
            float(diff.max()),
            float(diff.mean()),
        )
    side = max(size)  # the padding is where PIL pastes: the fill colour survives on both, same place
    if side != min(size):
        assert torch.allclose(a["high_res_pixel_values"][..., 0, 0], b["high_res_pixel_values"][..., 0, 0])


def test_auto_classes_default_to_pil_and_pick_torchvision_when_asked(tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor

    from mgllava import MGLlavaProcessor
    from mgllava.data.image_processor import MGLlavaImageProcessorTorchvision

    MGLlavaProcessor.from_preset("tiny").save_pretrained(tmp_path)
    assert (
        type(AutoImageProcessor.from_pretrained(tmp_path)) is MGLlavaImageProcessor
    )  # the reference's pixels
    assert type(AutoProcessor.from_pretrained(tmp_path).image_processor) is MGLlavaImageProcessor
    fast = AutoProcessor.from_pretrained(tmp_path, backend="torchvision").image_processor
    assert type(fast) is MGLlavaImageProcessorTorchvision and fast.high_res_size == 128

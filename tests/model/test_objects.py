"""Object pooling equals the reference definition (upsample + concat + roi_align + mean), edges included."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import roi_align

from mgllava.model.objects import pool_object_features


def reference(stage_maps, boxes, image_size):
    """Independent literal implementation: materialise the upsampled map, torchvision RoIAlign, mean."""
    size = stage_maps[0].shape[-2:]
    maps = [F.interpolate(m[None], size=size, mode="bilinear", align_corners=False) for m in stage_maps]
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    out = roi_align(
        torch.cat(maps, 1), rois, 56, spatial_scale=size[0] / image_size, sampling_ratio=-1, aligned=False
    )
    return out.mean(dim=(2, 3))


def stages(sizes=((12, 32), (16, 16), (20, 8), (24, 4))):
    return [torch.randn(c, s, s) for c, s in sizes]


EDGE_BOXES = torch.tensor(
    [
        [0, 0, 128, 128],  # the whole image
        [0, 0, 0, 0],  # the reference's zero-box fallback
        [127, 127, 128, 128],  # a one-pixel box in the corner
        [60, 60, 60.2, 61],  # degenerate, sub-cell
        [120, 0, 128, 10],  # touching the right edge
        [-20, -20, 140, 140],  # beyond every edge
        [10.3, 20.7, 50.2, 90.9],  # fractional
        [0, 100, 128, 100],  # zero height on a row
        [200, 200, 260, 300],  # entirely outside
    ]
)


def test_matches_roi_align_on_edge_and_degenerate_boxes():
    maps = stages()
    ours = pool_object_features(maps, EDGE_BOXES, 128)
    assert ours.shape == (len(EDGE_BOXES), 12 + 16 + 20 + 24)
    torch.testing.assert_close(ours, reference(maps, EDGE_BOXES, 128), atol=1e-5, rtol=1e-5)


def test_matches_roi_align_on_random_boxes_at_paper_strides():
    maps = stages(((8, 96), (16, 48), (24, 24), (32, 12)))  # 384 px input, strides 4..32
    xy = torch.rand(40, 2) * 384
    wh = torch.rand(40, 2) * 200
    boxes = torch.cat([xy, xy + wh], 1)
    torch.testing.assert_close(
        pool_object_features(maps, boxes, 384), reference(maps, boxes, 384), atol=1e-5, rtol=1e-5
    )


def test_non_square_maps():
    maps = [torch.randn(4, 16, 24), torch.randn(6, 8, 12)]
    boxes = torch.tensor([[3.0, 5.0, 90.0, 50.0], [0.0, 0.0, 96.0, 64.0]])
    torch.testing.assert_close(
        pool_object_features(maps, boxes, 64), reference(maps, boxes, 64), atol=1e-5, rtol=1e-5
    )


def test_no_boxes_gives_empty_features():
    assert pool_object_features(stages(), torch.zeros(0, 4), 128).shape == (0, 72)


@pytest.mark.parametrize(
    "bad", [torch.tensor([[0.0, 0.0, float("nan"), 4.0]]), torch.tensor([[0.0, float("inf"), 4.0, 4.0]])]
)
def test_non_finite_boxes_are_refused(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        pool_object_features(stages(), bad, 128)


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match=r"boxes must be \(n, 4\)"):
        pool_object_features(stages(), torch.zeros(3), 128)
    with pytest.raises(ValueError, match=r"stage_maps\[0\] must be \(C, H, W\)"):
        pool_object_features([torch.zeros(1, 2, 4, 4)], torch.zeros(1, 4), 16)


def test_gradients_flow_to_the_maps():
    maps = [m.requires_grad_() for m in stages()]
    pool_object_features(maps, EDGE_BOXES[:3], 128).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)


def test_banded_pooling_on_channels_last_bf16_maps_and_boxes_in_a_few_bands():
    # 192-row stage 0 at a 768 px input: 16 bands of 12 rows; small boxes touch one or two bands, some none
    cl = [torch.randn(1, c, s, s).contiguous(memory_format=torch.channels_last)[0]
          for c, s in ((8, 192), (16, 96), (24, 48), (32, 24))]  # fmt: skip
    boxes = torch.tensor([[300.0, 300.0, 340.0, 330.0], [0.0, 700.0, 30.0, 768.0], [10.0, 5.0, 700.0, 20.0],
                          [800.0, 800.0, 900.0, 900.0]])  # fmt: skip
    torch.testing.assert_close(
        pool_object_features(cl, boxes, 768), reference(cl, boxes, 768), atol=1e-5, rtol=1e-5
    )
    half = [m.bfloat16() for m in cl]
    expected = reference([m.float() for m in half], boxes, 768)
    torch.testing.assert_close(pool_object_features(half, boxes, 768), expected, atol=1e-5, rtol=1e-5)


def test_boxes_that_touch_no_row_give_zeros():
    out = pool_object_features(stages(), torch.tensor([[200.0, 200.0, 260.0, 300.0]] * 3), 128)
    assert out.shape == (3, 72) and not out.any()


class AtomicAdds(TorchDispatchMode):
    """Records the ops that accumulate through atomic adds on GPUs, which makes their sums depend on timing:
    scatter_add / index_add / index_put with accumulate, and floating-point cumsum (torch's list of
    nondeterministic CUDA ops)."""

    ATOMIC = {"scatter_add", "scatter_add_", "index_add", "index_add_", "scatter_reduce", "scatter_reduce_"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        accumulate = name.startswith("index_put") and (
            kwargs.get("accumulate") or (len(args) > 3 and args[3])
        )
        float_cumsum = name.startswith("cumsum") and args[0].is_floating_point()
        if name in self.ATOMIC or accumulate or float_cumsum:
            self.seen.append(name)
        return func(*args, **kwargs)


def test_pooling_adds_in_a_fixed_order_without_atomic_adds():
    # on CPU these ops are deterministic anyway, so the test checks which ops run: none that adds atomically
    maps = stages(((8, 96), (16, 48), (24, 24), (32, 12)))
    xy = torch.rand(30, 2) * 384
    boxes = torch.cat([xy, xy + torch.rand(30, 2) * 200], 1)
    all_boxes = torch.cat([boxes, EDGE_BOXES * 3])
    fast = pool_object_features(maps, all_boxes, 384)  # the CPU default: index_add_ (fixed order on the CPU)
    torch.use_deterministic_algorithms(True)  # the path GPUs take
    try:
        with AtomicAdds() as mode:
            out = pool_object_features(maps, all_boxes, 384)
        assert mode.seen == []
        assert torch.equal(out, pool_object_features(maps, all_boxes, 384))
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(out, fast, rtol=1e-5, atol=1e-6)  # the same sums in another order

"""Object tokens: one feature vector per box, pooled from the high-res ConvNeXt stages (docs/design.md section 5).

Reference definition, for one image with stage maps ``S_s`` of shape ``(C_s, H_s, W_s)``::

    U   = concat_s(upsample_bilinear(S_s, size=(H_0, W_0), align_corners=False))    (sum C_s, H_0, W_0)
    R   = roi_align(U, boxes, output_size=56, spatial_scale=H_0 / image_size,
                    sampling_ratio=-1, aligned=False)                                 (n, sum C_s, 56, 56)
    out = R.mean((2, 3))                                                              (n, sum C_s)

At 768 px that map is 2880 x 192 x 192 floats (425 MB) and RoIAlign over it takes seconds. Every step is
linear and separable in y and x: RoIAlign's mean over its 56 x 56 bins is the mean over a product grid of
sample points, bilinear sampling is a product of two 1-D hat weights, and bilinear upsampling is
``A_s @ S_s @ B_s.T``. So each box reduces to one weight vector per axis, ``w_y`` (H_0) and ``w_x`` (W_0),
and ``out_s = (A_s.T w_y).T @ S_s @ (B_s.T w_x)`` on the native stage maps - no upsampled map at all.

A box only touches the rows where its ``u = A_s.T w_y`` is non-zero. Each stage is cut into bands of rows
(`_band_rows`: ~12 rows, at most 16 bands); in band b, the boxes that touch it get the kernel
``outer(u[b rows], v)`` and one batched GEMM over all bands reads each band of the map once
(channels-last, a band is a contiguous ``(rows * W_s, C_s)`` block), with the kernels of a band padded to
the band with most boxes. At 100 boxes of 10 to 300 px on a 768 px image this is ~40% of the work of one
dense ``outer(u, v) @ S_s`` GEMM over the whole map.

Deterministic: no op accumulates through atomic adds on a GPU (scatter_add, index_add, floating-point
cumsum are all nondeterministic there): a cell's axis weight is an exact fixed-point run sum
(`_axis_weights`) and a box sums its bands' GEMM rows by a gather and a sum over bands, in band order
(`_pool_stage`); the tests check which ops run. On the CPU, whose `index_add_` adds in a fixed order, the
bands are combined by `index_add_` (faster: the gather took 1.4x the time at 100 boxes) unless
`torch.use_deterministic_algorithms(True)` is on; both give the same values up to float rounding (tested).
Gradients (stage maps that require them) go back through indexing, whose CUDA backward accumulates: only
the forward pass is claimed deterministic.

Deviation from the reference: none in the numbers (tested against ``torchvision.ops.roi_align`` on the
materialised map, edges and degenerate boxes included); only the order of float operations differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROI_OUTPUT_SIZE = 56
_FIXED = 2.0**32  # fixed-point scale of the axis weights' exact sums (`_axis_weights`)


def _upsample_matrix(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """(dst, src) matrix of PyTorch's 1-D linear upsampling, align_corners=False, as used per axis by
    ``F.interpolate(mode="bilinear")`` (the 2-D kernel is the product of two such 1-D kernels)."""
    if src == dst:
        return torch.eye(dst, device=device)
    eye = torch.eye(src, device=device).unsqueeze(0)  # (1, src channels, src length)
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T


def _axis_weights(start: torch.Tensor, end: torch.Tensor, size: int, pooled: int) -> torch.Tensor:
    """Mean bilinear weight over RoIAlign's sample points along one axis.

    start, end: (n,) float32 box edges already multiplied by the spatial scale. Returns (n, size) with
    ``w[k] @ line`` equal to the mean over this axis' sample points of torchvision's bilinear sample of
    ``line`` (its rules for points outside [-1, size] and at the last cell included).

    A box's samples, taken in order (bin by bin, then within a bin), have non-decreasing cells, so each cell's
    weight is the sum over a run of samples (found by `searchsorted`): a difference of prefix sums. These are
    summed in 2**-32 fixed point as int64, exact in any order, so the result does not depend on the order of
    atomic adds (no scatter; floating-point `cumsum` is not deterministic on GPUs either); the rounding,
    at most 2**-33 per sample, is far below float32's.
    """
    length = torch.clamp(end - start, min=1.0)  # aligned=False: roi size at least one cell
    bin_size = length / pooled
    grid = torch.ceil(length / pooled).to(torch.long).clamp(min=1)  # sampling_ratio=-1 (adaptive)
    n, g_max = start.shape[0], int(grid.max()) if start.numel() else 1
    m = torch.arange(pooled * g_max, device=start.device).view(
        1, -1
    )  # sample m: bin m // grid, point m % grid
    p, i = m // grid.view(n, 1), m % grid.view(n, 1)
    offset = ((i.to(start.dtype) + 0.5) * bin_size.view(n, 1)) / grid.view(n, 1).to(start.dtype)
    coord = start.view(n, 1) + p.to(start.dtype) * bin_size.view(n, 1) + offset  # (n, pooled * g_max)
    used = (m < pooled * grid.view(n, 1)) & (coord >= -1.0) & (coord <= size)
    low = coord.clamp(min=0.0).to(torch.long)
    at_edge = low >= size - 1
    frac = torch.where(at_edge | (coord < 0), torch.zeros_like(coord), coord - low.to(coord.dtype))
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    cell = torch.where(used, low, torch.where(coord < -1.0, -1, size))  # non-decreasing along each row
    cells = torch.arange(size, device=start.device).expand(n, size).contiguous()
    first = torch.searchsorted(cell, cells)  # (n, size): each cell's run of samples is [first, last)
    last = torch.searchsorted(cell, cells, right=True)

    def per_cell(values: torch.Tensor) -> torch.Tensor:  # (n, samples) in [0, 1] -> (n, size): run sums
        prefix = F.pad(torch.round(values * _FIXED).to(torch.long).cumsum(1), (1, 0))
        return (prefix.gather(1, last) - prefix.gather(1, first)).to(values.dtype) / _FIXED

    near = per_cell((1.0 - frac) * used)  # the weight a sample gives its own cell
    far = per_cell(frac * used)  # and the next cell (zero at the last cell: frac is 0 at the edge)
    weights = near + F.pad(far[:, :-1], (1, 0))
    return weights / (pooled * grid.to(start.dtype)).view(n, 1)


def _check_inputs(stage_maps: list[torch.Tensor], boxes: torch.Tensor) -> None:
    if not stage_maps:
        raise ValueError("stage_maps is empty: pass the ConvNeXt stage outputs, each (C_s, H_s, W_s)")
    for s, m in enumerate(stage_maps):
        if m.dim() != 3:
            raise ValueError(f"stage_maps[{s}] must be (C, H, W) for one image, got shape {tuple(m.shape)}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (n, 4) xyxy, got shape {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or inf; the processor drops such boxes before pooling")


def _band_rows(height: int) -> int:
    """Rows per band: the smallest divisor of `height` that is at least max(6, height / 16)."""
    target = max(6, -(-height // 16))
    return next(d for d in range(min(target, height), height + 1) if height % d == 0)


def _pool_stage(stage: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, C) = sum over y, x of u[n, y] v[n, x] stage[:, y, x], band by band (module docstring)."""
    c, h, w = stage.shape
    n, device = u.shape[0], u.device
    rows = stage.float().permute(1, 2, 0)  # (h, w, C); a view when the map is channels-last
    if not rows.is_contiguous():
        rows = rows.contiguous()
    band = _band_rows(h)
    bands = h // band
    touched = u != 0
    has = touched.any(1)
    first = torch.where(has, touched.to(torch.uint8).argmax(1), h)  # (n,) first row with weight
    last = torch.where(has, h - touched.flip(1).to(torch.uint8).argmax(1), 0)  # (n,) one past the last
    starts = torch.arange(bands, device=device) * band
    active = (first[None, :] < starts[:, None] + band) & (last[None, :] > starts[:, None])  # (bands, n)
    counts = active.sum(1)
    used = counts.nonzero().flatten()
    if used.numel() == 0:
        return torch.zeros(n, c, device=device)
    b0, b1 = int(used[0]), int(used[-1]) + 1  # the bands between the first and last touched ones
    active, counts, width = active[b0:b1], counts[b0:b1], int(counts.max())
    order = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :width]  # active boxes first
    slot = torch.arange(width, device=device)[None, :] < counts[:, None]
    index = torch.where(slot, order, n)  # (b1 - b0, width); n = a zero padding box
    u_pad = torch.cat([u, u.new_zeros(1, h)]).view(n + 1, bands, band)[:, b0:b1]
    v_pad = torch.cat([v, v.new_zeros(1, w)])
    u_band = u_pad[index, torch.arange(b1 - b0, device=device)[:, None]]  # (b1 - b0, width, band)
    kernel = (u_band[..., None] * v_pad[index][:, :, None, :]).view(b1 - b0, width, band * w)
    pooled = torch.bmm(kernel, rows[b0 * band : b1 * band].view(b1 - b0, band * w, c))  # (b1 - b0, width, C)
    if stage.device.type == "cpu" and not torch.are_deterministic_algorithms_enabled():
        # CPU's index_add_ adds in a fixed order (deterministic there) and is the fastest combination (the
        # band-order gather below took 1.4x the time at 100 boxes, in the same process)
        out = pooled.new_zeros(n + 1, c, dtype=torch.float32)
        out.index_add_(0, index.flatten(), pooled.reshape(-1, c).float())
        return out[:n]
    # each box sums its bands' rows in band order (a gather, no atomic adds); a band it misses gives 0
    slot = (active.cumsum(1) - 1).clamp(min=0)  # (b1 - b0, n): the box's row in the band's GEMM
    band_of = torch.arange(b1 - b0, device=device)[:, None]
    gathered = pooled[band_of, slot].float()  # bmm is bf16 under autocast; sum in float32
    return torch.where(active[..., None], gathered, 0.0).sum(0)  # (n, C)


def pool_object_features(
    stage_maps: list[torch.Tensor], boxes: torch.Tensor, image_size: int, output_size: int = ROI_OUTPUT_SIZE
) -> torch.Tensor:
    """RoI-mean features of ``boxes`` over all stages upsampled to stage 0, without materialising them.

    stage_maps: ConvNeXt stage outputs of one image, each (C_s, H_s, W_s) (fastest when channels-last).
    boxes: (n, 4) xyxy in input pixels (the ``image_size`` frame).
    Returns (n, sum C_s) float32, equal to the reference definition in this module's docstring.
    """
    _check_inputs(stage_maps, boxes)
    height, width = stage_maps[0].shape[-2:]
    device = stage_maps[0].device
    channels = sum(m.shape[0] for m in stage_maps)
    if boxes.shape[0] == 0:
        return torch.zeros(0, channels, device=device)
    # torchvision scales in double and stores float32 box edges; do the same so grids match exactly
    scaled = (boxes.to(device, torch.float64) * (height / image_size)).to(torch.float32)
    w_y = _axis_weights(scaled[:, 1], scaled[:, 3], height, output_size)  # (n, H_0)
    w_x = _axis_weights(scaled[:, 0], scaled[:, 2], width, output_size)  # (n, W_0)
    pooled = []
    for stage in stage_maps:
        _, h, w = stage.shape
        u = w_y @ _upsample_matrix(h, height, device)  # (n, H_s)
        v = w_x @ _upsample_matrix(w, width, device)  # (n, W_s)
        pooled.append(_pool_stage(stage, u, v))  # (n, C_s)
    return torch.cat(pooled, dim=1)


def pool_object_features_reference(
    stage_maps: list[torch.Tensor], boxes: torch.Tensor, image_size: int, output_size: int = ROI_OUTPUT_SIZE
) -> torch.Tensor:
    """The reference's literal computation (materialise, RoIAlign, mean); for tests and benchmarks only."""
    from torchvision.ops import roi_align

    _check_inputs(stage_maps, boxes)
    size = stage_maps[0].shape[-2:]
    upsampled = [
        F.interpolate(m[None].float(), size=size, mode="bilinear", align_corners=False) for m in stage_maps
    ]
    feature_map = torch.cat(upsampled, dim=1)  # (1, sum C_s, H_0, W_0)
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1).float()
    pooled = roi_align(
        feature_map,
        rois,
        output_size=output_size,
        spatial_scale=size[0] / image_size,
        sampling_ratio=-1,
        aligned=False,
    )
    return pooled.mean(dim=(2, 3))


def roi_flops(stage_shapes: list[tuple[int, int, int]], num_boxes: int) -> int:
    """Floating-point operations of one dense ``outer(u, v) @ S_s`` GEMM per stage for one image: an upper
    bound of `pool_object_features`' work, which skips the bands of rows a box does not touch."""
    return sum(2 * num_boxes * c * h * w for c, h, w in stage_shapes)

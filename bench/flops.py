"""Floating-point operations of an MG-LLaVA prefill, per part, from the configs (no model needed).

The counting rules are those of `torch.utils.flop_counter.FlopCounterMode`, so that the formulas can be
checked against it (tests/test_bench.py does, part by part, on a small config): a matmul of (m, k) by
(k, n) is 2mkn (bias adds are not counted); a convolution is 2 * output pixels * C_out * C_in/groups * k^2;
attention is 4 * heads * q_len * k_len * head_dim (QK^T and AV, causal masking not discounted); norms,
activations and other elementwise ops are not counted.

Per image, with CLIP width D, MLP width I, T = g^2 + 1 tokens (CLS included), L layers, patch p:

    CLIP      2 g^2 D 3 p^2 + L (8 T D^2 + 4 T D I + 4 T^2 D)     L: the layers through the feature layer
              (ours: 23 of 24 at the paper's sizes; transformers' LLaVA runs all of them)
    ConvNeXt  stem 2 (S/4)^2 C_0 3 * 16 + per stage s (side n_s, width C_s, depth d_s):
              downsample 2 n_s^2 C_s C_{s-1} 4 (s > 0) + d_s (2 n_s^2 C_s 49 + 16 n_s^2 C_s^2)
    Conv-Gate with N = g^2 tokens, C_lo low-res and C_hi last-stage width:
              2 N C_hi^2 + 2 N C_hi C_lo + 2 N C_lo 49 + 2 N C_lo^2 + 2 (2 C_lo C_lo/2 + C_lo/2)
    pooling   2 n sum_s C_s H_s W_s   (`mgllava.model.objects.roi_flops`)
    projector 2 rows (C_in H + H^2), for the N image rows (C_in = C_lo) and the n object rows (C_in = sum C_s)

and for the LLM over the whole sequence of t tokens (width H, MLP width I, kv width H_kv, V words):

    LLM       layers (2 t H (2 H + 2 H_kv) + 6 t H I + 4 t^2 H) + 2 logits_rows H V
"""

from __future__ import annotations

from dataclasses import dataclass

from mgllava.model.configuration import high_res_stage_strides, low_res_grid
from mgllava.model.objects import roi_flops


@dataclass(frozen=True)
class PrefillShape:
    """What one prefill processes: images (or video frames), boxes per image, text tokens."""

    images: int = 1
    boxes_per_image: int = 0
    text_tokens: int = 40

    @property
    def boxes(self) -> int:
        return self.images * self.boxes_per_image


def clip_flops(vision_config, images: int = 1, layers: int | None = None) -> int:
    """CLIP's FLOPs through `layers` layers (None: all)."""
    g, d, i = low_res_grid(vision_config), vision_config.hidden_size, vision_config.intermediate_size
    p, t = vision_config.patch_size, low_res_grid(vision_config) ** 2 + 1
    patch = 2 * g * g * d * 3 * p * p
    layer = 8 * t * d * d + 4 * t * d * i + 4 * t * t * d
    return images * (patch + (vision_config.num_hidden_layers if layers is None else layers) * layer)


def clip_layers_used(config) -> int:
    """The CLIP layers our low-res encoder runs: those its feature layer depends on."""
    return config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)


def convnext_stage_shapes(high_res_config) -> list[tuple[int, int, int]]:
    """(C_s, H_s, W_s) of each stage output for one square image."""
    side = high_res_config.image_size
    return [
        (c, side // stride, side // stride)
        for c, stride in zip(
            high_res_config.hidden_sizes, high_res_stage_strides(high_res_config), strict=True
        )
    ]


def convnext_flops(high_res_config, images: int = 1) -> int:
    shapes = convnext_stage_shapes(high_res_config)
    p = high_res_config.patch_size
    c0, side0 = shapes[0][0], shapes[0][1]
    total = 2 * side0 * side0 * c0 * high_res_config.num_channels * p * p  # stem
    prev = c0
    for s, ((c, n, _), depth) in enumerate(zip(shapes, high_res_config.depths, strict=True)):
        if s > 0:
            total += 2 * n * n * c * prev * 4  # 2x2 stride-2 downsampling conv
        total += depth * (2 * n * n * c * 49 + 16 * n * n * c * c)  # depthwise 7x7 + MLP (4x)
        prev = c
    return images * total


def conv_gate_flops(low_dim: int, high_dim: int, tokens: int, images: int = 1) -> int:
    n = tokens
    per_image = (
        2 * n * high_dim * high_dim  # slow_conv
        + 2 * n * high_dim * low_dim  # slow_proj
        + 2 * n * low_dim * 49  # fast_conv (depthwise 7x7)
        + 2 * n * low_dim * low_dim  # fast_proj
        + 2 * (2 * low_dim * (low_dim // 2) + low_dim // 2)  # gate MLP on the mean token
    )
    return images * per_image


def pooling_flops(high_res_config, boxes: int) -> int:
    return roi_flops(convnext_stage_shapes(high_res_config), boxes)


def projector_flops(in_dim: int, hidden: int, rows: int) -> int:
    return 2 * rows * (in_dim * hidden + hidden * hidden)


def llm_flops(text_config, tokens: int, logits_rows: int | None = None) -> int:
    """Decoder layers over `tokens` positions plus the LM head over `logits_rows` (all positions by default,
    as a plain forward computes them; `generate`'s prefill keeps only the last)."""
    h, i, v = text_config.hidden_size, text_config.intermediate_size, text_config.vocab_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    q_dim, kv_dim = heads * head_dim, kv * head_dim
    t = tokens
    layer = 2 * t * h * (2 * q_dim + 2 * kv_dim) + 6 * t * h * i + 4 * t * t * q_dim
    rows = tokens if logits_rows is None else logits_rows
    return text_config.num_hidden_layers * layer + 2 * rows * h * v


def sequence_length(config, shape: PrefillShape, with_objects: bool = True) -> int:
    """Tokens the LLM reads: text plus the image rows (and object rows) of every image."""
    rows = config.num_image_tokens + (shape.boxes_per_image if with_objects else 0)
    return shape.text_tokens + shape.images * rows


def mgllava_flops(config, shape: PrefillShape) -> dict[str, int]:
    """FLOPs per part of an MG-LLaVA prefill (the paper's Conv-Gate and concatenated object tokens)."""
    if config.fusion != "conv_gate" or config.object_tokens != "concat":
        raise ValueError(
            f"FLOP formulas cover the paper's model (fusion=conv_gate, object_tokens=concat), "
            f"not fusion={config.fusion}, object_tokens={config.object_tokens}"
        )
    vision, high, text = config.vision_config, config.high_res_config, config.text_config
    n_img = shape.images
    hidden = text.hidden_size
    return {
        "CLIP": clip_flops(vision, n_img, clip_layers_used(config)),
        "ConvNeXt": convnext_flops(high, n_img),
        "fusion": conv_gate_flops(vision.hidden_size, high.hidden_sizes[-1], config.num_image_tokens, n_img),
        "pooling": n_img * pooling_flops(high, shape.boxes_per_image),
        "projectors": projector_flops(vision.hidden_size, hidden, n_img * config.num_image_tokens)
        + projector_flops(config.object_feature_dim, hidden, shape.boxes),
        "LLM": llm_flops(text, sequence_length(config, shape)),
    }


def llava_flops(config, shape: PrefillShape) -> dict[str, int]:
    """FLOPs per part of transformers' LLaVA with the same CLIP and LLM (no high-res branch, no objects)."""
    vision, text = config.vision_config, config.text_config
    return {
        "CLIP": clip_flops(vision, shape.images),
        "projectors": projector_flops(
            vision.hidden_size, text.hidden_size, shape.images * config.num_image_tokens
        ),
        "LLM": llm_flops(text, sequence_length(config, shape, with_objects=False)),
    }


def decode_weight_bytes(text_config, bytes_per_param: int) -> int:
    """Bytes of LLM weights one decode step reads: every decoder layer, the final norm and the LM head (the
    embedding table is only indexed, one row)."""
    h, i, v = text_config.hidden_size, text_config.intermediate_size, text_config.vocab_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    layer = attn + 3 * h * i + 2 * h
    return bytes_per_param * (text_config.num_hidden_layers * layer + h + v * h)

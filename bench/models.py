"""The models the prefill, scaling and decode benches run, their inputs, and time per part.

Full size (the default): the `mgllava-vicuna-7b` preset - CLIP ViT-L/14 at 336 px, ConvNeXt-L at 768 px,
Conv-Gate, object tokens, a Vicuna-7B-width LLM (4096 wide, MLP 11008, vocabulary 32001) cut to 2 layers so
that a CPU runs it in seconds - with random weights. `--quick`: the same resolutions (576 image tokens,
768 px stage maps) with narrow towers and a narrow LLM, for a smoke run.

The peer is transformers' `LlavaForConditionalGeneration` built on the meta device and then given our CLIP
tower, our image projector and our LLM as its own modules (shared, not copied): both compute the same thing,
and with no boxes and the Conv-Gate at its identity initialisation they give the same logits.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from flops import PrefillShape
from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration

PRESET = "mgllava-vicuna-7b"
LLM_LAYERS = 2
QUICK_VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, patch_size=14, image_size=336)  # fmt: skip
QUICK_HIGH = dict(model_type="convnext", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=768)
QUICK_TEXT = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip


def bench_config(quick: bool) -> MGLlavaConfig:
    if quick:
        return MGLlavaConfig(vision_config=QUICK_VISION, high_res_config=QUICK_HIGH, text_config=QUICK_TEXT,
                             image_token_id=2047)  # fmt: skip
    text = MGLlavaConfig.from_preset(PRESET).text_config.to_dict()
    text["num_hidden_layers"] = LLM_LAYERS
    text["max_position_embeddings"] = 8192  # room for 8 video frames of 576 + boxes rows
    return MGLlavaConfig.from_preset(PRESET, text_config=text)


def describe(config: MGLlavaConfig, quick: bool) -> str:
    v, h, t = config.vision_config, config.high_res_config, config.text_config
    what = (
        "small widths, real resolutions" if quick else f"`{PRESET}` with the LLM cut to {LLM_LAYERS} layers"
    )
    return (
        f"{what}: CLIP {v.hidden_size} wide x {v.num_hidden_layers} layers at {v.image_size} px, ConvNeXt "
        f"{list(h.hidden_sizes)} x {list(h.depths)} at {h.image_size} px, LLM {t.hidden_size} wide x "
        f"{t.num_hidden_layers} layers (MLP {t.intermediate_size}, vocabulary {t.vocab_size}), random weights"
    )


def build_ours(config: MGLlavaConfig, dtype: torch.dtype = torch.float32) -> MGLlavaForConditionalGeneration:
    torch.manual_seed(0)
    return MGLlavaForConditionalGeneration(config).to(dtype).eval()


def build_peer(ours: MGLlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """transformers' LLaVA whose CLIP, projector and LLM are `ours`' modules."""
    config = (
        ours.config
    )  # copies of the sub-configs: building the peer must not change ours (attention backend)
    peer_config = LlavaConfig(vision_config=copy.deepcopy(config.vision_config),
                              text_config=copy.deepcopy(config.text_config),
                              image_token_index=config.image_token_id,
                              vision_feature_layer=config.vision_feature_layer,
                              vision_feature_select_strategy="default",
                              projector_hidden_act=config.projector_hidden_act)  # fmt: skip
    with torch.device("meta"):
        peer = LlavaForConditionalGeneration(peer_config)
    peer.model.vision_tower = ours.vision_tower.clip
    peer.model.multi_modal_projector.linear_1 = ours.projector[0]
    peer.model.multi_modal_projector.linear_2 = ours.projector[2]
    peer.model.language_model = ours.model.language_model
    peer.lm_head = ours.lm_head
    left = [name for name, t in [*peer.named_parameters(), *peer.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the peer still has meta tensors: {left[:5]}")
    return peer.eval()


def random_boxes(n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """n xyxy boxes inside a side x side image, 10 px to 40% of the side wide and high."""
    xy = torch.rand(n, 2, generator=generator) * side * 0.9
    wh = 10 + torch.rand(n, 2, generator=generator) * side * 0.4
    return torch.cat([xy, xy + wh], 1).clamp(max=side)


def prefill_inputs(config: MGLlavaConfig, shape: PrefillShape, seed: int = 0) -> tuple[dict, dict]:
    """(ours, peer) keyword arguments for one prefill: text, then each image's rows (576 image rows, plus its
    boxes' rows for ours), then the rest of the text; same pixels and text for both."""
    g = torch.Generator().manual_seed(seed)
    vocab, image_id = config.text_config.vocab_size, config.image_token_id
    text = torch.randint(10, min(vocab, 32000) - 1, (1, shape.text_tokens), generator=g)
    text[text == image_id] = 10
    head, tail = text[:, : min(5, shape.text_tokens)], text[:, min(5, shape.text_tokens) :]
    low, high = config.vision_config.image_size, config.high_res_config.image_size
    pixels = torch.randn(shape.images, 3, low, low, generator=g)
    high_pixels = torch.randn(shape.images, 3, high, high, generator=g)
    boxes = torch.cat([random_boxes(shape.boxes_per_image, high, g) for _ in range(shape.images)])

    def ids(rows: int) -> torch.Tensor:
        return torch.cat([head, torch.full((1, shape.images * rows), image_id), tail], dim=1)

    ours_ids = ids(config.num_image_tokens + shape.boxes_per_image)
    ours = {"input_ids": ours_ids, "attention_mask": torch.ones_like(ours_ids), "pixel_values": pixels,
            "high_res_pixel_values": high_pixels, "object_boxes": boxes,
            "object_counts": torch.full((shape.images,), shape.boxes_per_image)}  # fmt: skip
    peer_ids = ids(config.num_image_tokens)
    peer = {"input_ids": peer_ids, "attention_mask": torch.ones_like(peer_ids), "pixel_values": pixels}
    return ours, peer


SHORT = {"float32": "fp32", "bfloat16": "bf16"}  # a dtype's name in tables


def in_dtype(batch: dict, dtype: torch.dtype) -> dict:
    """The batch with its pixels in `dtype` (ids, masks and boxes as they are)."""
    return {k: v.to(dtype) if k.endswith("pixel_values") else v for k, v in batch.items()}


def ours_parts(model: MGLlavaForConditionalGeneration) -> dict[str, list[nn.Module]]:
    # the tower: its forward runs CLIP's layers through the feature layer (not `CLIPVisionModel.forward`)
    return {"CLIP": [model.vision_tower], "ConvNeXt": [model.high_res_tower], "fusion": [model.fusion],
            "projectors": [model.projector, model.box_projector], "LLM": [model.model.language_model, model.lm_head]}  # fmt: skip


def peer_parts(model: LlavaForConditionalGeneration) -> dict[str, list[nn.Module]]:
    return {"CLIP": [model.model.vision_tower], "projectors": [model.model.multi_modal_projector],
            "LLM": [model.model.language_model, model.lm_head]}  # fmt: skip


class PartTimer:
    """Wall seconds spent inside named (non-nested) submodules during forwards, from forward hooks."""

    def __init__(self, parts: dict[str, list[nn.Module]]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._starts: dict[int, float] = {}
        self._handles = []
        for name, modules in parts.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(self._stop(name)))

    def _start(self, module: nn.Module, args: object) -> None:
        self._starts[id(module)] = time.perf_counter()

    def _stop(self, name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            self.seconds[name] += time.perf_counter() - self._starts.pop(id(module))

        return hook

    def take(self) -> dict[str, float]:
        """Seconds per part since the last `take`."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

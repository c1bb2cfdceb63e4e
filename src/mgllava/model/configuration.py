"""`MGLlavaConfig`: the HF config of MG-LLaVA (docs/design.md sections 1-5).

Three sub-configs - the CLIP low-res tower (`vision_config`), the ConvNeXt high-res tower
(`high_res_config`, its `image_size` is the high-res input side) and the LLM (`text_config`) - plus the
new modules: `fusion` ("conv_gate", the paper's; ablations "none", "concat", "patch_info_mining",
"resampler"), `object_tokens` ("concat", the paper's; ablations "off", "cross_attn_f2b", "cross_attn_b2f"), and
`image_token_id`, the placeholder id that the processor repeats once per visual row
(576 image rows + one row per object box, docs/design.md section 6).

Sizes are derived, never hard-coded: the CLIP grid is `image_size // patch_size`, the ConvNeXt last-stage
grid is `image_size // (patch_size * 2 ** (num_stages - 1))`; a pair whose grids differ is refused here.

`context_length` is the longest sequence (prompt + answer) the model is run at; unset, it is the LLM's
`max_position_embeddings`. A video model sets it longer (8 frames are >= 4,616 visual rows): positions past
`max_position_embeddings` then use the LLM's RoPE unchanged (no scaling), which is what the reference's
video model was trained and evaluated with.

Presets live in `mgllava/configs/models/<name>.yaml`: `tiny` (random weights, seconds), the five
paper models at their real sizes, and `mgllava-vicuna-7b-video` (the paper's video model).

Deviation from the reference: the reference splices visual rows at id -200, which is not a vocabulary
entry; here the placeholder is a real token (`<image>`) so that HF `generate` and its logits processors
see only valid ids. For LLMs whose vocabulary has no free row this adds one embedding row (and one
`lm_head` row, zero-initialised, suppressed in generation and masked out of the loss; docs/design.md 13.1).
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..config import read_yaml

FUSIONS = ("none", "conv_gate", "concat", "patch_info_mining", "resampler")
OBJECT_TOKENS = ("off", "concat", "cross_attn_f2b", "cross_attn_b2f")
APPENDS_ROWS = {"off": False, "concat": True, "cross_attn_f2b": False, "cross_attn_b2f": True}

CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
}
CONVNEXT_L_768 = {
    "hidden_sizes": [192, 384, 768, 1536],
    "depths": [3, 3, 27, 3],
    "layer_norm_eps": 1e-6,
    "image_size": 768,
}

# With no text_config the LLM is Llama-shaped with Vicuna-1.5's vocabulary plus the `<image>` row that
# `mgllava assemble` appends at id 32000, so that `MGLlavaConfig()` builds with its default image_token_id.
VICUNA_VOCAB = {"vocab_size": 32001}


def preset_names() -> list[str]:
    folder = resources.files("mgllava") / "configs" / "models"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw preset dict (`model` and `processor` sections) of `mgllava/configs/models/<name>.yaml`, read
    with the project's YAML rules (`mgllava.config`: `off` stays a string, `base:` chains merge)."""
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return read_yaml(name, "models")


def low_res_grid(vision_config: PreTrainedConfig) -> int:
    return int(vision_config.image_size) // int(vision_config.patch_size)


def high_res_stage_strides(high_res_config: PreTrainedConfig) -> list[int]:
    """Stride of each ConvNeXt stage output: stem `patch_size`, then x2 per downsampling stage."""
    return [int(high_res_config.patch_size) * 2**i for i in range(high_res_config.num_stages)]


def high_res_grid(high_res_config: PreTrainedConfig) -> int:
    return int(high_res_config.image_size) // high_res_stage_strides(high_res_config)[-1]


@strict
class MGLlavaConfig(PreTrainedConfig):
    model_type = "mg_llava"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L_336
        ),
        "high_res_config": SubConfigSpec(
            config_class=AutoConfig, model_type="convnext", init_kwargs=CONVNEXT_L_768
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=VICUNA_VOCAB),
    }

    vision_config: dict | PreTrainedConfig | None = None
    high_res_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    fusion: Literal["none", "conv_gate", "concat", "patch_info_mining", "resampler"] = "conv_gate"
    object_tokens: Literal["off", "concat", "cross_attn_f2b", "cross_attn_b2f"] = "concat"
    object_roi_size: int = 56
    context_length: int | None = None
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for field, allowed in (("fusion", FUSIONS), ("object_tokens", OBJECT_TOKENS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {', '.join(allowed)}")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length must be a positive number of tokens, got {self.context_length}")
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        low, high = low_res_grid(self.vision_config), high_res_grid(self.high_res_config)
        if low != high:
            raise ValueError(
                f"low-res grid {low}x{low} (CLIP {self.vision_config.image_size}px / patch "
                f"{self.vision_config.patch_size}) differs from high-res grid {high}x{high} (ConvNeXt "
                f"{self.high_res_config.image_size}px / stride {high_res_stage_strides(self.high_res_config)[-1]}); "
                "pick resolutions whose grids match"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the LLM vocabulary (size "
                f"{self.text_config.vocab_size}); grow text_config.vocab_size to cover the placeholder"
            )

    @property
    def max_sequence_length(self) -> int:
        """Longest prompt + answer the model runs: `context_length`, else the LLM's `max_position_embeddings`."""
        if self.context_length is not None:
            return int(self.context_length)
        return int(self.text_config.max_position_embeddings)

    @property
    def uses_high_res(self) -> bool:
        """Whether the model has the ConvNeXt: for the fusion, the object features, or both."""
        return self.fusion != "none" or self.object_tokens != "off"

    @property
    def num_image_tokens(self) -> int:
        """Visual rows per image before object tokens (576 for CLIP-L/14 at 336 px)."""
        return low_res_grid(self.vision_config) ** 2

    @property
    def object_feature_dim(self) -> int:
        """Channels of the concatenated ConvNeXt stages pooled per box (2880 for ConvNeXt-L)."""
        return sum(self.high_res_config.hidden_sizes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MGLlavaConfig:
        """Config of a named preset (`tiny`, `mgllava-vicuna-7b`, ...); keyword overrides win."""
        model = dict(load_preset(name)["model"])
        model.update(overrides)
        return cls(**model)

"""The two frozen vision towers and the contract they publish (docs/design.md sections 1 and 3).

- `LowResEncoder`: transformers `CLIPVisionModel` (openai/clip-vit-large-patch14-336 in the paper).
  Output: hidden_states[vision_feature_layer] without CLS, (B, grid*grid, hidden_size) = (B, 576, 1024).
  Its forward runs the layers up to that one only (the paper's penultimate: 23 of 24 layers), the same ops
  as `CLIPVisionModel` with every hidden state returned, which `clip_outputs` still gives when asked.
- `HighResEncoder`: the ConvNeXt trunk (OpenCLIP convnext_large_d_320 in the paper) as transformers'
  `ConvNextEmbeddings` + `ConvNextStage`s; output: the stage maps [(B, C_s, H_s, W_s)] for s = 0..3,
  at 768 px (192,192,192) (384,96,96) (768,48,48) (1536,24,24).

Fusion and RoI pooling read channels, strides and grids from these objects, never from constants.

Speed: when autograd is not recording (inference, frozen towers), each ConvNeXt block runs its activation,
layer scale and residual add in place on the tensors it has just created (`ConvNextBlock`): the same ops in
the same order, so bit-identical, but a block allocates 7 instead of 12 channel-widths of fresh memory. On
CPU every large fresh allocation is page-faulted in again, which cost the frozen tower ~10% of its time.

Numerics: the in-place path keeps `ConvNextModel`'s dtypes at every point. In float32 and in pure bf16 every
op keeps its dtype and runs in place. Under bf16 autocast (how training runs the frozen tower) the convolutions
and linear layers give bf16 while the layer scale and the residual stream stay float32, so the scaled branch
is float32 new memory (as in `ConvNextModel`) and the residual is added into it in place; the stage maps are
float32. Tested bit for bit against `ConvNextModel` run the same way in all three (tests/model/test_encoders.py).

Deviation from the reference: the OpenCLIP trunk's `head` and `norm_pre` are not built at all (the
reference builds and ignores them), and `ConvNextModel`'s pooling LayerNorm is left out, so every parameter
here is one that the forward pass uses or that a checkpoint provides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
from transformers.models.convnext.modeling_convnext import (
    ConvNextEmbeddings,
    ConvNextLayer,
    ConvNextPreTrainedModel,
    ConvNextStage,
)

from .configuration import high_res_stage_strides, low_res_grid


class LowResEncoder(CLIPPreTrainedModel):
    """CLIP ViT at low resolution; `forward(pixels (B,3,S,S)) -> (B, grid**2, hidden_size)`. A CLIP
    `PreTrainedModel` (its attention implementations, init and `_no_split_modules`) holding transformers'
    `CLIPVisionModel` as `clip`."""

    config: CLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: CLIPVisionConfig, feature_layer: int = -2) -> None:
        super().__init__(config)
        self.clip = CLIPVisionModel(config)
        self.feature_layer = feature_layer
        self.image_size = int(config.image_size)
        self.hidden_size = int(config.hidden_size)
        self.grid = low_res_grid(config)
        self.post_init()
        for param in self.unused_parameters():
            param.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        """CLIP's parameters that the features never depend on, kept frozen (a trainable one would get no
        gradient, which DDP refuses): the layers after `feature_layer` (the last one at the paper's -2) and
        `post_layernorm` (it feeds only CLIP's pooled output)."""
        layers = self.clip.encoder.layers
        used = self.feature_layer % (len(layers) + 1)  # hidden_states[k] is the output of layer k - 1
        unused = [*layers[used:], self.clip.post_layernorm]
        return [p for module in unused for p in module.parameters()]

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def clip_outputs(
        self, pixel_values: torch.Tensor, output_attentions: bool = False
    ) -> BaseModelOutputWithPooling:
        """CLIP's own output with every layer's hidden states (and its attentions when asked)."""
        return self.clip(pixel_values, output_hidden_states=True, output_attentions=output_attentions)

    def select(self, outputs: BaseModelOutputWithPooling) -> torch.Tensor:
        """The feature layer without CLS: (B, grid*grid, C)."""
        return outputs.hidden_states[self.feature_layer][:, 1:]

    @property
    def layers_used(self) -> int:
        """CLIP layers the feature layer depends on (hidden_states[0] is the embeddings' output)."""
        return self.feature_layer % (len(self.clip.encoder.layers) + 1)

    def forward(self, pixel_values: torch.Tensor, keep_cls: bool = False) -> torch.Tensor:
        """The feature layer without CLS, (B, grid*grid, C) (with it first when `keep_cls`), computed through
        that layer and no further."""
        hidden = self.clip.pre_layrnorm(self.clip.embeddings(pixel_values))  # (B, 1 + grid*grid, C)
        for layer in self.clip.encoder.layers[: self.layers_used]:
            hidden = layer(hidden, None)
        return hidden if keep_cls else hidden[:, 1:]


class ConvNextBlock(ConvNextLayer):
    """transformers' `ConvNextLayer` (same parameters and keys); when autograd does not record, GELU, layer
    scale and the residual add run in place on the block's own intermediates - never on its input - where the
    result keeps their dtype, which gives bit-identical outputs (float32, bf16, bf16 autocast) with fewer
    large allocations."""

    def __init__(self, config: ConvNextConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.exact_gelu = config.hidden_act == "gelu"  # ACT2FN["gelu"] is the erf GELU, as aten's gelu_

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        recording = torch.is_grad_enabled() and (
            features.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if recording or not self.exact_gelu:
            return super().forward(features)
        hidden = self.pwconv1(self.layernorm(self.dwconv(features).permute(0, 2, 3, 1)))  # (B, H, W, 4C)
        torch.ops.aten.gelu_(hidden)
        out = self.pwconv2(hidden)  # (B, H, W, C)
        if self.layer_scale_parameter is not None:
            out = _in_place_if_same_dtype(torch.mul, out, self.layer_scale_parameter)
        out = self.drop_path(out.permute(0, 3, 1, 2))  # (B, C, H, W); the identity outside training
        return _in_place_if_same_dtype(torch.add, out, features)


def _in_place_if_same_dtype(
    op: Callable[..., torch.Tensor], out: torch.Tensor, other: torch.Tensor
) -> torch.Tensor:
    """`op(out, other)`, written into `out` when the result keeps its dtype. Under autocast `out` comes from a
    bf16 linear layer while the layer scale and the residual are float32: the result is then float32, as in
    `ConvNextLayer`, and needs new memory. Both ops are commutative elementwise, so the bits are the same."""
    if torch.result_type(out, other) == out.dtype:
        return op(out, other, out=out)
    return op(out, other)


class ConvNextStages(nn.Module):
    """The stages of transformers' `ConvNextEncoder` as a plain module (same keys: `stages.i.*`), so that
    model-wide settings meant for attention layers (`attn_implementation`) are not applied to it; each stage
    is a `ConvNextStage` whose blocks are `ConvNextBlock`s."""

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        widths = [config.hidden_sizes[0], *config.hidden_sizes]
        self.stages = nn.ModuleList()
        for i in range(config.num_stages):
            stage = ConvNextStage(config, widths[i], widths[i + 1], stride=2 if i > 0 else 1, depth=0)
            stage.layers = nn.ModuleList(
                ConvNextBlock(config, widths[i + 1]) for _ in range(config.depths[i])
            )
            self.stages.append(stage)


class HighResEncoder(ConvNextPreTrainedModel):
    """ConvNeXt stem + stages; `forward(pixels (B,3,S,S)) -> [stage maps (B, C_s, S/stride_s, S/stride_s)]`.
    A ConvNeXt `PreTrainedModel` (its init, which sets the layer scale; no attention, so no attention
    implementation to choose); a stage is never split across devices (ConvNeXt's `_no_split_modules`)."""

    _no_split_modules = ["ConvNextEmbeddings", "ConvNextStage", "ConvNextBlock"]
    # No attention layers: every implementation is accepted and none changes anything (as transformers'
    # timm wrappers declare), so a model-wide `attn_implementation` passes through to CLIP and the LLM.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def get_correct_attn_implementation(
        self, requested: str | None, is_init_check: bool = False
    ) -> str | None:
        """What was asked, unchecked and unresolved (nothing here attends): building the tower leaves its
        config's attention unset, so the config still builds transformers' `ConvNextModel`."""
        return requested

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__(config)
        self.embeddings = ConvNextEmbeddings(config)
        self.encoder = ConvNextStages(config)
        self.image_size = int(config.image_size)
        self.stage_channels = [int(c) for c in config.hidden_sizes]
        self.stage_strides = high_res_stage_strides(config)
        self.grid = self.image_size // self.stage_strides[-1]
        # no `post_init()` here: the composite's initialises these weights, in the order (and so with the
        # random numbers) of before this was a PreTrainedModel

    @property
    def pooled_channels(self) -> int:
        return sum(self.stage_channels)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.embeddings(pixel_values)
        stages = []
        for stage in self.encoder.stages:
            hidden = stage(hidden)
            stages.append(hidden)
        return stages

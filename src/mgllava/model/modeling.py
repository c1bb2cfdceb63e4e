"""`MGLlavaModel` and `MGLlavaForConditionalGeneration`: the composite MG-LLaVA model (docs/design.md
sections 1, 5, 6), structured as transformers' LLaVA.

    pixel_values (B_img,3,336,336) ──► vision_tower ──► L (B_img,576,C_lo) ─┐
    high_res_pixel_values (B_img,3,768,768) ──► high_res_tower ──► S_0..S_3 ├► fusion ─► F (B_img,576,C_lo)
                                                                             │  projector ─► V (B_img,576,H)
    object_boxes (sum n_i,4), object_counts (B_img,) ──► RoI mean over S_0..S_3 ─► box_projector ─► O_i (n_i,H)
    input_ids with [V_i O_i] placeholder runs ──► embed, scatter rows ──► language_model ──► hidden states
                                                                          (ForConditionalGeneration) lm_head ──► logits

`MGLlavaModel` holds the towers, fusion, projectors and the LLM's decoder (`AutoModel` of the text config)
and returns hidden states; `MGLlavaForConditionalGeneration` is `model` plus a top-level `lm_head` (tied to
the embeddings when the LLM ties them), as `LlavaModel`/`LlavaForConditionalGeneration`. The composite reads
and assigns the base model's parts under their names (`model.vision_tower`, ..., `model.language_model`, the
decoder) and `named_parts` gives the parts a training stage names (`language_model`: decoder and head).
Folders in the flat layout of before (`language_model.model.*`, `language_model.lm_head.*`, `fusion.*`, ...)
load through a registered key map, and `save_pretrained` reverts it, so folders keep that layout on disk.

The processor writes one `image_token_id` per visual row (576 + n_i per image, in image order) and the
model fills them in order; a count mismatch is an error naming both numbers. Placeholders are found through
`input_ids`, or through `inputs_embeds` (positions holding the placeholder's embedding row) when only
embeddings are given, as transformers' LLaVA does. `get_image_features` returns one `(576 + n_i, H)` tensor
per image, so transformers' `generate` encodes the images once before prefill (`mm_encoder_outputs`, through
the base model as for LLaVA) and callers may pass pre-computed features to reuse them across turns.

Deviations from LLaVA: two towers and object rows (one placeholder per visual row, not per image patch),
and `get_image_features`' `pooler_output` holds an image's object rows after its image rows.
Deviations from the reference (docs/design.md section 13): real attention masks and position ids for padded
batches; text-only samples add no phantom row; the placeholder is a vocabulary token, not -200, and its
column is left out of the loss (`mask_placeholder`: the cross-entropy is the reference's, over the LLM's own
vocabulary), its embedding and output rows get no gradient, and generation suppresses it. Placeholders
in text given without images keep their own embedding row (as LLaVA's do), with a warning. RoI features
are averaged in float32 and then cast (the reference casts before the 56x56 mean).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import MGLlavaConfig
from .encoders import ConvNextBlock, HighResEncoder, LowResEncoder
from .fusion import build_fusion
from .init import init_leaf
from .object_tokens import ObjectMixer
from .objects import pool_object_features
from .projector import build_projector

logger = logging.get_logger(__name__)


class MGLlavaModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    """The base model's output: the decoder's `last_hidden_state`, `cache`, `hidden_states`, `attentions`, and
    `image_outputs` (an `MGLlavaImageOutput`), as `LlavaModel` returns."""


class MGLlavaCausalLMOutput(MultimodalCausalLMOutputWithPast):
    """transformers' multimodal causal-LM output: `loss`, `logits`, `cache`, `hidden_states`, `attentions`,
    and `image_outputs` (an `MGLlavaImageOutput`), as `LlavaForConditionalGeneration` declares it."""


@dataclass
class MGLlavaImageOutput(BaseModelOutputWithPooling):
    """What `get_image_features` returns, as LLaVA's: `last_hidden_state`, the CLIP tower's output at the
    feature layer (B_img, 1 + 576, C_lo), CLS included (LLaVA's is the last layer; layers after the feature
    layer are not run here); `pooler_output`: one (576 + n_i, H) tensor of visual rows per image
    (projected image rows, then its object rows: what fills its placeholders). When asked
    (`output_hidden_states`, `output_attentions`), as LLaVA returns its tower's: `hidden_states` and
    `attentions` of the CLIP tower (embeddings + every layer, CLS included), and `high_res_hidden_states`,
    the ConvNeXt stage maps (B_img, C_s, H_s, W_s)."""

    high_res_hidden_states: tuple[torch.Tensor, ...] | None = None


def mask_placeholder(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """A float32 copy of `logits` (..., V) with the placeholder's column at -inf: the distribution over the
    LLM's own vocabulary, which is the reference's (it splices images at id -200 and has no such column).
    The loss and the likelihood harness read this; the returned logits keep the column as computed. Under
    autograd the column gets no gradient, so neither does the placeholder's output row."""
    out = logits.float()
    if out.data_ptr() == logits.data_ptr():
        out = out.clone()
    out[..., image_token_id] = float("-inf")
    return out


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    image_token_id: int,
    chunk_tokens: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `_loss` (shifted cross-entropy over the LLM's vocabulary, placeholder column
    masked, sum / `num_items_in_batch` or mean) without the (B, T, V) logits: only the positions with a
    label are sent through the head, `chunk_tokens` rows at a time, each chunk checkpointed so that its
    float32 logits live only while it is computed (forward) and recomputed (backward).
    hidden (B, T, H), labels (B, T) -> scalar."""
    if chunk_tokens < 1:
        raise ValueError(f"loss_chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    rows, targets = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,)

    def chunk_loss(part: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        logits = mask_placeholder(lm_head(part), image_token_id)
        return nn.functional.cross_entropy(logits, want, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        part, want = rows[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, part, want, use_reentrant=False)
        else:
            total = total + chunk_loss(part, want)
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch  # no label at all: nan, as HF
    return total / torch.as_tensor(count, device=total.device)


# The top-level modules, in data-flow order. The pretrained parts come from released checkpoints, the new
# ones are MG-LLaVA's own. A variant builds a subset (no `box_projector` when object tokens are off);
# training stages name these (or the group `new_modules`), and the model refuses a module not listed here.
MODULES = ("vision_tower", "high_res_tower", "fusion", "projector", "box_projector", "object_mixer",
           "language_model")  # fmt: skip
PRETRAINED_MODULES = ("vision_tower", "high_res_tower", "language_model")
NEW_MODULES = tuple(m for m in MODULES if m not in PRETRAINED_MODULES)
TOWER_BLOCKS = ("CLIPVisionEmbeddings", "CLIPEncoderLayer", "ConvNextEmbeddings", "ConvNextBlock")


def _param_of(module: nn.Module) -> torch.Tensor:
    """A tensor with the module's dtype and device: a parameter, else a buffer (an inference engine's packed
    linear layer keeps its weight outside the parameters: `inference.linear`)."""
    return next(itertools.chain(module.parameters(), module.buffers()))


def _zeros(module: nn.Module, *shape: int) -> torch.Tensor:
    """Zeros on the device and in the dtype of `module`'s parameters."""
    param = _param_of(module)
    return torch.zeros(*shape, device=param.device, dtype=param.dtype)


class MGLlavaPreTrainedModel(PreTrainedModel):
    config: MGLlavaConfig
    config_class = MGLlavaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The attention of CLIP and of the LLM's decoder follows `attn_implementation` (both support these); the
    # ConvNeXt, fusion and projectors have none; the ablations' `CrossAttention` always calls torch's SDPA.
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Not one graph: the object path reads box counts on the host (`object_counts.tolist()`), checks the
    # placeholder count against the visual rows (`int(mask.sum())`), and its shapes depend on the boxes
    # (RoI weights per box, rows per image), so `torch.compile(fullgraph=True)` breaks there. The decoder
    # alone is the LLM's own transformers model and compiles as that model does.
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        if hasattr(module, "init_rule"):
            init_leaf(module)  # Conv-Gate layers: docs/design.md section 4 init, identity at start
        else:
            super()._init_weights(module)
        if isinstance(module, ConvNextBlock) and module.layer_scale_parameter is not None:
            # as ConvNextPreTrainedModel does: a model built on the meta device gets it from here
            hf_init.constant_(
                module.layer_scale_parameter, self.config.high_res_config.layer_scale_init_value
            )


def build_visual_modules(module: nn.Module, config: MGLlavaConfig) -> None:
    """Set the vision path's modules on `module` under their `MODULES` names (`vision_tower`, `high_res_tower`,
    `fusion`, `projector`, `box_projector`, `object_mixer`), as this variant of `config` has them."""
    hidden = config.text_config.hidden_size
    module.vision_tower = LowResEncoder(config.vision_config, config.vision_feature_layer)
    module.high_res_tower = HighResEncoder(config.high_res_config) if config.uses_high_res else None
    stage_dims = list(config.high_res_config.hidden_sizes)
    module.fusion = build_fusion(config.fusion, module.vision_tower.hidden_size, stage_dims)
    module.projector = build_projector(module.fusion.out_dim, hidden, config.projector_hidden_act)
    module.box_projector = (
        build_projector(config.object_feature_dim, hidden, config.projector_hidden_act)
        if config.object_tokens != "off"
        else None
    )
    module.object_mixer = ObjectMixer(config.object_tokens, hidden)


class VisualRows:
    """The vision path over the modules `build_visual_modules` sets: images and boxes -> each image's visual
    rows. `MGLlavaModel` is one user; the vLLM plugin's model (`mgllava.vllm`) is the other, so that both
    compute the rows with the same code. Needs `self.config` (an `MGLlavaConfig`)."""

    config: MGLlavaConfig

    def get_object_features(
        self, stages: list[torch.Tensor], object_boxes: torch.Tensor, object_counts: torch.Tensor
    ) -> list[torch.Tensor]:
        """One (n_i, H) tensor per image: RoI mean over all stages, then `box_projector`."""
        if object_counts.numel() != stages[0].shape[0]:
            raise ValueError(
                f"object_counts has {object_counts.numel()} entries but there are {stages[0].shape[0]} images"
            )
        counts = [int(c) for c in object_counts.tolist()]
        if sum(counts) != object_boxes.shape[0]:
            raise ValueError(
                f"object_counts sum to {sum(counts)} but object_boxes has {object_boxes.shape[0]} rows"
            )
        weight = _param_of(self.box_projector)
        stages = [s.to(stages[0].device) for s in stages]  # stages may sit on several devices (device_map)
        per_image = object_boxes.to(stages[0].device).split(counts)
        pooled = [
            pool_object_features([s[i] for s in stages], boxes, self.high_res_tower.image_size)
            for i, boxes in enumerate(per_image)
        ]  # each (n_i, sum C_s) float32
        return [self.box_projector(p.to(weight.device, weight.dtype)) for p in pooled]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        high_res_pixel_values: torch.Tensor | None = None,
        object_boxes: torch.Tensor | None = None,
        object_counts: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> MGLlavaImageOutput | tuple:
        """Visual rows per image: `pooler_output[i]` is (num_image_tokens + n_i, H), image rows then objects;
        the towers' hidden states and attentions when asked (`MGLlavaImageOutput`); a tuple with
        `return_dict=False`."""
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        attentions = self.config.output_attentions if output_attentions is None else output_attentions
        low_param = _param_of(self.vision_tower)
        pixels = pixel_values.to(low_param.device, low_param.dtype)
        clip_out = self.vision_tower.clip_outputs(pixels, attentions) if hidden or attentions else None
        # (B, 1 + N, C_lo); without outputs to return, CLIP runs only the layers the feature layer needs
        features = (
            clip_out.hidden_states[self.vision_tower.feature_layer]
            if clip_out is not None
            else self.vision_tower(pixels, keep_cls=True)
        )
        low = features[:, 1:]  # (B, N, C_lo): CLS dropped
        stages = self._high_res_stages(high_res_pixel_values)
        stages_here = [s.to(low.device) for s in stages] if stages is not None else None
        fused = self.fusion(low, stages_here)  # (B, N, fusion.out_dim)
        proj_param = _param_of(self.projector)
        image_rows = self.projector(fused.to(proj_param.device, proj_param.dtype))  # (B, N, H)
        rows = list(image_rows)
        if self.box_projector is not None:
            if (object_boxes is None) != (object_counts is None):
                raise ValueError("object_boxes and object_counts go together (processor output): pass both")
            if object_boxes is None:  # no boxes: no object rows, as `boxes=[]` for every image
                object_boxes = pixel_values.new_zeros(0, 4)
                object_counts = torch.zeros(len(rows), dtype=torch.long)
            objects = self.get_object_features(stages, object_boxes, object_counts)
            rows = [self.object_mixer(r, o.to(r.device, r.dtype)) for r, o in zip(rows, objects, strict=True)]
        return MGLlavaImageOutput(
            last_hidden_state=features,
            pooler_output=rows,
            hidden_states=clip_out.hidden_states if hidden else None,
            attentions=clip_out.attentions if attentions else None,
            high_res_hidden_states=tuple(stages) if hidden and stages is not None else None,
        )

    def _high_res_stages(self, high_res_pixel_values: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The ConvNeXt stage maps, or None for a model without the high-res tower."""
        if self.high_res_tower is None:
            return None
        if high_res_pixel_values is None:
            raise ValueError(
                f"this model (fusion={self.config.fusion}, object_tokens={self.config.object_tokens}) "
                "needs high_res_pixel_values; the MGLlavaProcessor produces them"
            )
        high_param = _param_of(self.high_res_tower)
        return self.high_res_tower(high_res_pixel_values.to(high_param.device, high_param.dtype))


class MGLlavaModel(VisualRows, MGLlavaPreTrainedModel):
    """The base model: vision towers, fusion, projectors and the LLM's decoder (no LM head); `forward` returns
    the decoder's hidden states (`MGLlavaModelOutputWithPast`), as `LlavaModel` does."""

    MODULES = MODULES
    PRETRAINED_MODULES = PRETRAINED_MODULES
    NEW_MODULES = NEW_MODULES

    def __init__(self, config: MGLlavaConfig) -> None:
        super().__init__(config)
        build_visual_modules(self, config)
        self.language_model = AutoModel.from_config(config.text_config)
        # blocks `device_map="auto"` keeps on one device (the decoder's layer comes from the decoder itself):
        # CLIP's embeddings and layers, ConvNeXt's stem and blocks (whose residual is added in place), and
        # the fusion and object mixer, whose forwards combine their children's outputs
        self._no_split_modules = [*TOWER_BLOCKS, type(self.fusion).__name__, type(self.object_mixer).__name__]
        undeclared = [name for name, _ in self.named_children() if name not in self.MODULES]
        if undeclared:
            raise TypeError(f"modules {undeclared} are not declared in mgllava.model.modeling.MODULES")
        self.post_init()

    def new_modules(self) -> list[str]:
        """The names of this variant's own (non-pretrained) modules that have parameters."""
        children = dict(self.named_children())
        return [n for n in self.NEW_MODULES if n in children and any(True for _ in children[n].parameters())]

    # -- embeddings delegate to the LLM -------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor:
        """(B, T) bool, True at placeholder positions: from `input_ids`, or, without them, where
        `inputs_embeds` holds the placeholder's embedding row (as transformers' LLaVA finds them)."""
        if input_ids is not None:
            return (input_ids == self.config.image_token_id).to(inputs_embeds.device)
        token = torch.tensor(self.config.image_token_id, device=self.get_input_embeddings().weight.device)
        row = self.get_input_embeddings()(token).to(inputs_embeds.device, inputs_embeds.dtype)
        return (inputs_embeds == row).all(-1)

    def _scatter_visual_rows(
        self, mask: torch.Tensor, inputs_embeds: torch.Tensor, rows: list[torch.Tensor]
    ) -> torch.Tensor:
        features = torch.cat(rows).to(inputs_embeds.device, inputs_embeds.dtype)
        n_tokens, n_rows = int(mask.sum()), features.shape[0]
        if n_tokens != n_rows:
            raise ValueError(
                f"the text has {n_tokens} image placeholder tokens but the images give {n_rows} visual rows "
                f"({len(rows)} images); process text and images together with MGLlavaProcessor"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def _placeholders_without_images(
        self, mask: torch.Tensor, inputs_embeds: torch.Tensor, cache: Cache | None
    ) -> torch.Tensor:
        """Text with placeholders and no images: they keep the placeholder's own embedding row, as LLaVA embeds
        them (transformers' common tests, eager vs SDPA, feed such text), but that row gets no gradient. A
        direct call (no cache) warns once: the processor never writes placeholders without their images."""
        if cache is None and bool(mask.any()):
            logger.warning_once(
                f"the text has {int(mask.sum())} image placeholder tokens but no images were given: they are "
                "embedded as the placeholder's own row; pass the images the processor expanded them for"
            )
        if torch.is_grad_enabled() and inputs_embeds.requires_grad:
            inputs_embeds = torch.where(mask.unsqueeze(-1), inputs_embeds.detach(), inputs_embeds)
        return inputs_embeds

    def _visual_graph_anchor(self, like: torch.Tensor) -> torch.Tensor:
        """Zero, but connected to every trainable visual module: a text-only training batch then still gives
        those modules (zero) gradients, so that data-parallel ranks reduce the same parameters (a rank
        whose batch has no image would otherwise skip them and the others would wait for it forever).
        The reference kept its graph connected the same way, with zero-length slices of image features."""
        terms = []
        for tower in (self.vision_tower, self.high_res_tower):
            if tower is not None and any(p.requires_grad for p in tower.parameters()):
                out = tower(_zeros(tower, 1, 3, tower.image_size, tower.image_size))
                terms += out if isinstance(out, list) else [out]
        low = _zeros(self.projector, 1, self.vision_tower.num_tokens, self.vision_tower.hidden_size)
        stages = None
        if self.high_res_tower is not None:
            tower = self.high_res_tower
            sides = [tower.image_size // stride for stride in tower.stage_strides]
            stages = [
                _zeros(self.projector, 1, c, n, n) for c, n in zip(tower.stage_channels, sides, strict=True)
            ]
        rows = self.projector(self.fusion(low, stages))
        terms.append(rows)
        if self.box_projector is not None:
            objects = self.box_projector(_zeros(self.box_projector, 1, self.config.object_feature_dim))
            terms.append(self.object_mixer(rows[0], objects))
        return sum(t.float().sum() for t in terms).to(like.dtype) * 0.0

    # -- forward ------------------------------------------------------------------------------------------
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        high_res_pixel_values: torch.Tensor | None = None,
        object_boxes: torch.Tensor | None = None,
        object_counts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MGLlavaModelOutputWithPast | tuple:
        """The decoder's hidden states over the text with every image's visual rows in its placeholders."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            raise ValueError("pass either pixel_values or pre-computed mm_encoder_outputs, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_out = (mm_encoder_outputs or {}).get("image")
        if image_out is None and pixel_values is not None:
            image_out = self.get_image_features(
                pixel_values,
                high_res_pixel_values,
                object_boxes,
                object_counts,
                output_hidden_states=kwargs.get("output_hidden_states"),
                output_attentions=kwargs.get("output_attentions"),
                return_dict=True,
            )
        placeholders = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, T)
        if image_out is not None:
            inputs_embeds = self._scatter_visual_rows(
                placeholders, inputs_embeds, list(image_out.pooler_output)
            )
        else:
            inputs_embeds = self._placeholders_without_images(placeholders, inputs_embeds, cache)
            if self.training and torch.is_grad_enabled():
                inputs_embeds = inputs_embeds + self._visual_graph_anchor(inputs_embeds)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return MGLlavaModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_outputs=image_out,
        )


class MGLlavaForConditionalGeneration(MGLlavaPreTrainedModel, GenerationMixin):
    """`MGLlavaModel` (`self.model`) plus the LLM's LM head (`self.lm_head`), as `LlavaForConditionalGeneration`.

    The base model's parts are reachable here under their old names (`vision_tower`, `projector`, ...,
    `language_model`: the decoder without its head), for the callers that always read them from here."""

    MODULES = MODULES
    PRETRAINED_MODULES = PRETRAINED_MODULES
    NEW_MODULES = NEW_MODULES
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MGLlavaConfig) -> None:
        super().__init__(config)
        self.model = MGLlavaModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()
        if self.generation_config is not None and not self.generation_config.suppress_tokens:
            self.generation_config.suppress_tokens = [
                config.image_token_id
            ]  # `configure_generation` keeps it

    def __setattr__(self, name: str, value: object) -> None:
        # `nn.Module.__setattr__` registers a module as a child of whatever object it is set on: a part of the
        # base model assigned here (`model.fusion = ...`, `model.language_model = peft_model`) goes there
        if name in MODULES and "model" in self._modules:
            setattr(self.model, name, value)
        else:
            super().__setattr__(name, value)

    def new_modules(self) -> list[str]:
        """The names of this variant's own (non-pretrained) modules that have parameters."""
        return self.model.new_modules()

    def named_parts(self) -> dict[str, list[nn.Module]]:
        """The model's parts by their `MODULES` name, those this variant builds: what a training stage names.
        `language_model` is the decoder and the LM head together (the LLM as released)."""
        children = dict(self.model.named_children())
        parts = {name: [children[name]] for name in self.MODULES if children.get(name) is not None}
        parts["language_model"] = [self.model.language_model, self.lm_head]
        return parts

    def set_causal_lm(self, causal_lm: PreTrainedModel) -> None:
        """Take a causal LM's decoder and LM head as this model's LLM (`mgllava assemble` loads the LLM as
        released, an `AutoModelForCausalLM`)."""
        self.model.language_model = causal_lm.get_decoder()
        self.lm_head = causal_lm.get_output_embeddings()

    # -- embeddings and the base model's parts ------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.model.language_model = decoder

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        high_res_pixel_values: torch.Tensor | None = None,
        object_boxes: torch.Tensor | None = None,
        object_counts: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> MGLlavaImageOutput | tuple:
        """`MGLlavaModel.get_image_features`: one (576 + n_i, H) tensor of visual rows per image."""
        return self.model.get_image_features(
            pixel_values,
            high_res_pixel_values,
            object_boxes,
            object_counts,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )

    def get_object_features(
        self, stages: list[torch.Tensor], object_boxes: torch.Tensor, object_counts: torch.Tensor
    ) -> list[torch.Tensor]:
        """`MGLlavaModel.get_object_features`."""
        return self.model.get_object_features(stages, object_boxes, object_counts)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor:
        """`MGLlavaModel.get_placeholder_mask`."""
        return self.model.get_placeholder_mask(input_ids, inputs_embeds)

    # -- forward ------------------------------------------------------------------------------------------
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        high_res_pixel_values: torch.Tensor | None = None,
        object_boxes: torch.Tensor | None = None,
        object_counts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        loss_chunk_tokens: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MGLlavaCausalLMOutput | tuple:
        """As `LlavaForConditionalGeneration.forward`, plus MG-LLaVA's image inputs. `loss_chunk_tokens`
        (training, with `labels`): the loss is computed from the supervised positions only, that many at a
        time, each chunk's logits recomputed in the backward (`chunked_lm_loss`), and `logits` is None: the
        head's memory is then one chunk's logits instead of the whole sequence's."""
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            high_res_pixel_values=high_res_pixel_values,
            object_boxes=object_boxes,
            object_counts=object_counts,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        if loss_chunk_tokens is not None and labels is not None:
            logits = None
            loss = chunked_lm_loss(
                out.last_hidden_state, self.lm_head, labels, self.config.image_token_id, loss_chunk_tokens,
                kwargs.get("num_items_in_batch"),
            )  # fmt: skip
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(out.last_hidden_state[:, keep, :])  # (B, T_kept, V)
            loss = self._loss(logits, labels, kwargs) if labels is not None else None
        return MGLlavaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_outputs=out.image_outputs,
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The causal-LM loss (shifted cross-entropy, `num_items_in_batch` honoured) over the LLM's
        vocabulary: the placeholder's column is masked out (`mask_placeholder`), as the reference has none."""
        return self.loss_function(
            logits=mask_placeholder(logits, self.config.image_token_id),
            labels=labels,
            vocab_size=self.config.text_config.vocab_size,
            **kwargs,
        )


def _part(name: str) -> property:
    """A read-only view on `self.model.<name>`; assignment goes there too (`__setattr__`)."""
    return property(
        lambda self: getattr(self.model, name), doc=f"`self.model.{name}` (the base model's part)."
    )


for _name in MODULES:  # vision_tower, ..., language_model: read through to the base model
    setattr(MGLlavaForConditionalGeneration, _name, _part(_name))


def _register_key_map() -> None:
    """Load checkpoints in the flat layout of mg-llava before `MGLlavaModel` (`vision_tower.*`, ...,
    `language_model.model.*`, `language_model.lm_head.*`: every folder written by `mgllava assemble`,
    `write_folder` or training until then), as transformers maps LLaVA's old layout: the ForCG map moves
    the parts under `model.` (and the head to `lm_head`), the base model's map drops the decoder's inner
    `model.`. Saving reverts the map, so folders are still written in the flat layout."""
    parts = "|".join(m for m in MODULES if m != "language_model")
    register_checkpoint_conversion_mapping(
        "MGLlavaModel",
        [WeightRenaming(source_patterns=r"^language_model\.model\.", target_patterns="language_model.")],
        overwrite=True,
    )
    register_checkpoint_conversion_mapping(
        "mg_llava",
        [
            WeightRenaming(source_patterns=r"^language_model\.lm_head\.", target_patterns="lm_head."),
            WeightRenaming(source_patterns=r"^language_model\.", target_patterns="model.language_model."),
            # one rule for all parts: a variant without some part (no object_mixer weights) still uses it
            WeightRenaming(source_patterns=rf"^({parts})\.", target_patterns=r"model.\1."),
        ],
        overwrite=True,
    )


_register_key_map()

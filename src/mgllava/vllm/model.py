"""`MGLlavaForVLLM`: MG-LLaVA in vLLM, our vision path in front of vLLM's own LLM (docs/vllm.md).

    pixel_values (B,3,S_lo,S_lo), high_res_pixel_values (B,3,S_hi,S_hi), object_boxes (sum K_i,4),
    object_counts (B,)  --VisualRows.get_image_features (CLIP -> ConvNeXt -> Conv-Gate -> projector;
    RoI mean over the ConvNeXt stages -> box_projector)-->  one (576 + K_i, H) tensor per image
    vLLM scatters those rows over each image's placeholder run, then runs `language_model`: vLLM's own
    implementation of `text_config`'s architecture (LlamaForCausalLM for Vicuna and Llama-3,
    Phi3ForCausalLM, LlamaForCausalLM for Yi), with vLLM's paged KV cache, tensor and pipeline parallelism.

Weights load from our folders' safetensors names as they are: the vision modules sit on this model under
their `MODULES` names (`vision_tower.*`, `high_res_tower.*`, `fusion.*`, `projector.*`, `box_projector.*`,
`object_mixer.*`) and the LLM under `language_model` (`language_model.model.*`, `language_model.lm_head.*`,
the flat layout `save_pretrained` writes). Every key is accounted for: a key the model does not hold, or a
parameter no key fills, is an error naming them.

Deviations from our engine: the vision modules are replicated on every tensor-parallel rank (they are
small next to the LLM and run once per image). As in our engine, the placeholder's logit column is -inf
(`compute_logits`): `<image>` is never generated (the reference has no such vocabulary row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..model.configuration import MGLlavaConfig
from ..model.modeling import VisualRows, build_visual_modules
from .processing import MGLlavaDummyInputsBuilder, MGLlavaMultiModalProcessor, MGLlavaProcessingInfo

LANGUAGE_MODEL = "language_model"


@MULTIMODAL_REGISTRY.register_processor(
    MGLlavaMultiModalProcessor, info=MGLlavaProcessingInfo, dummy_inputs=MGLlavaDummyInputsBuilder
)
class MGLlavaForVLLM(VisualRows, nn.Module, SupportsMultiModal, SupportsPP):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"MG-LLaVA on vLLM takes images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: MGLlavaConfig = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            build_visual_modules(self, config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, LANGUAGE_MODEL),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One (num_image_tokens + K_i, H) tensor of visual rows per image, in prompt order."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        boxes, counts = kwargs.get("object_boxes"), kwargs.get("object_counts")
        out = self.get_image_features(
            _joined(pixel_values, torch.stack),  # (B, 3, S_lo, S_lo)
            _joined(kwargs.get("high_res_pixel_values"), torch.stack),  # (B, 3, S_hi, S_hi)
            _joined(boxes, torch.cat).float() if boxes is not None else None,  # (sum K_i, 4)
            _joined(counts, torch.stack).flatten() if counts is not None else None,  # (B,)
            return_dict=True,
        )
        return tuple(out.pooler_output)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.language_model.compute_logits(hidden_states)  # (T, V) or None off the last PP rank
        if logits is not None:
            logits[..., self.config.image_token_id] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our safetensors names as they are; raises naming unknown keys and parameters left unfilled."""
        own = dict(self.named_parameters())
        llm_prefix = LANGUAGE_MODEL + "."
        loaded: set[str] = set()
        unknown: list[str] = []
        llm_weights = []
        for name, tensor in weights:
            if name.startswith(llm_prefix):
                llm_weights.append((name.removeprefix(llm_prefix), tensor))
            elif name in own:
                param = own[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
            elif name not in dict(self.named_buffers()):
                unknown.append(name)
        if unknown:
            raise ValueError(
                f"{len(unknown)} checkpoint keys have no parameter in MGLlavaForVLLM: {unknown[:8]}"
            )
        loaded |= {llm_prefix + n for n in self.language_model.load_weights(llm_weights)}
        missing = sorted(n for n in own if n not in loaded and not n.startswith(llm_prefix))
        if missing:
            raise ValueError(f"{len(missing)} vision parameters got no checkpoint key: {missing[:8]}")
        return loaded


def _joined(value: object, join: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor | None:
    """vLLM passes a field as one tensor, or as a list of per-image tensors (when their shapes differ)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return join(list(value))

"""The MG-LLaVA model: config, encoders, fusion, object pooling, projectors and the composite model."""

from .configuration import MGLlavaConfig
from .modeling import MGLlavaForConditionalGeneration, MGLlavaModel, MGLlavaPreTrainedModel

__all__ = ["MGLlavaConfig", "MGLlavaForConditionalGeneration", "MGLlavaModel", "MGLlavaPreTrainedModel"]

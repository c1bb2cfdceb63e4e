"""mg-llava: MG-LLaVA (arXiv 2406.17770) as an HF-native library.

Importing the package registers the model with transformers' Auto classes, so that
`AutoModelForImageTextToText.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` load a
saved MG-LLaVA folder.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.models.auto import image_processing_auto as _image_auto

from .data.image_processor import MGLlavaImageProcessor, MGLlavaImageProcessorTorchvision
from .data.processor import MGLlavaProcessor
from .model.configuration import MGLlavaConfig
from .model.modeling import MGLlavaForConditionalGeneration, MGLlavaModel

__version__ = "0.1.0"

AutoConfig.register("mg_llava", MGLlavaConfig, exist_ok=True)
AutoModel.register(MGLlavaConfig, MGLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(MGLlavaConfig, MGLlavaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MGLlavaConfig, MGLlavaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    MGLlavaConfig,
    image_processor_classes={"pil": MGLlavaImageProcessor, "torchvision": MGLlavaImageProcessorTorchvision},
    exist_ok=True,
)
# PIL by default (the reference's pixels), as transformers does for processors whose torchvision path differs
if "MGLlavaImageProcessor" not in _image_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS:
    _image_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS.append("MGLlavaImageProcessor")
AutoProcessor.register(MGLlavaConfig, MGLlavaProcessor, exist_ok=True)

__all__ = [
    "MGLlavaConfig",
    "MGLlavaForConditionalGeneration",
    "MGLlavaImageProcessor",
    "MGLlavaImageProcessorTorchvision",
    "MGLlavaModel",
    "MGLlavaProcessor",
]

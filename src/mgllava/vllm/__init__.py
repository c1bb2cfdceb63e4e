"""MG-LLaVA as an out-of-tree vLLM model (docs/vllm.md): the plugin that vLLM's `vllm.general_plugins` entry
point loads in every vLLM process.

    register() -> vLLM's ModelRegistry: "MGLlavaForConditionalGeneration" (the `architectures` entry of every
                  mg-llava folder) -> `mgllava.vllm.model.MGLlavaForVLLM`

`processing` turns a request's images and boxes into the model's tensors and each `<image>` into
576 + K_i placeholder rows (K_i: the image's own box count); `model` holds our vision path (CLIP, ConvNeXt,
Conv-Gate, projectors, object pooling: `mgllava.model.modeling.VisualRows`) and vLLM's own implementation of
the LLM's family. Only vLLM imports this package (the main install has no vLLM): nothing in `mgllava`
imports it.
"""

from __future__ import annotations

ARCHITECTURE = "MGLlavaForConditionalGeneration"


def register() -> None:
    """The `vllm.general_plugins` entry point: register the mg-llava config and processor with transformers
    (importing `mgllava` does that) and the model class with vLLM, by name so vLLM imports it lazily."""
    from vllm import ModelRegistry

    import mgllava  # noqa: F401 - registers MGLlavaConfig / MGLlavaProcessor with the Auto classes

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "mgllava.vllm.model:MGLlavaForVLLM")

"""vLLM's multimodal processing for MG-LLaVA: a request's images and boxes -> model tensors and placeholder rows.

    images (PIL, any size) + boxes per image (mm_processor_kwargs["boxes"], original pixels)
      --MGLlavaImageProcessor (ours: pad to square, S_hi px, the S_lo view from it, boxes into the square
        frame, NMS, caps, zero-box fallback)-->
      pixel_values (B,3,S_lo,S_lo), high_res_pixel_values (B,3,S_hi,S_hi), object_boxes (sum K_i,4) int64,
      object_counts (B,)
    prompt ids: each `<image>` id -> num_image_tokens + K_i `<image>` ids (576 + K_i for the paper models)

Boxes come per request as `mm_processor_kwargs={"boxes": [entry per image]}` (needs the server flag
`--trust-request-mm-kwargs`), an entry being what our server's `mgllava.boxes` takes: `[[x1, y1, x2, y2], ...]`,
`{"boxes": [...], "scores": [...], "labels": [...]}`, or null: the online proposer's boxes when the server
starts with one (`--mm-processor-kwargs '{"proposer": ["--detector", OWLV2_FOLDER, ...]}'`, the flags of
`mgllava serve`), else none (the zero-box fallback row). vLLM keys
its processing cache on the image and the request's `mm_processor_kwargs`, so the same image with other boxes
is processed again. vLLM keys an image on the request's whole `mm_processor_kwargs`; here each image's key
covers its own boxes entry instead of the list (`_get_mm_hashes`), and images found in the cache are left out
of `boxes` before the others are processed (`_get_cache_missing_processor_kwargs`), so each image keeps its
own boxes.

Memory profiling: vLLM sizes its encoder cache with the largest item. An image may give at most `max_boxes`
object rows (startup `--mm-processor-kwargs '{"max_boxes": N}'`, default `MAX_BOXES`); the dummy images carry
that many boxes, and a request whose image selects more is refused with an error naming both numbers.
Deviations from our engine: no box file (images arrive decoded, with nothing to look them up by), no
`<video>`, and no report of the boxes used (vLLM's responses have no field for it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from transformers import BatchFeature
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ..data.processor import MGLlavaProcessor
from ..model.configuration import MGLlavaConfig

# The reference's cap keeps at most `box_limit` (100) boxes, or 20 per label when more remain after NMS:
# 200 rows cover ten labels at that cap. Raise it at startup (`max_boxes`) for images with more.
MAX_BOXES = 200
KWARG_BOXES = "boxes"
KWARG_MAX_BOXES = "max_boxes"
KWARG_PROPOSER = "proposer"


def build_proposer(flags: Sequence[str]) -> Any:
    """The online box proposer from `mgllava serve`'s proposer flags (`--detector`, `--tagger`, ...), on the
    CPU of the process that runs vLLM's processing. A box file is refused: vLLM hands the processor decoded
    images, which have no content key to look a file up by."""
    import argparse

    from ..boxes.cli import add_proposer_options, proposer_from_args

    parser = argparse.ArgumentParser(prog="mm_processor_kwargs.proposer", exit_on_error=False)
    add_proposer_options(parser)
    try:
        args = parser.parse_args([str(f) for f in flags])
    except (argparse.ArgumentError, SystemExit) as err:
        raise ValueError(f"mm_processor_kwargs.proposer: bad flags {list(flags)}: {err}") from err
    if args.box_file:
        raise ValueError(
            "mm_processor_kwargs.proposer: --box-file cannot be used with vLLM (images reach the processor "
            "decoded, without the bytes or path a box file is keyed by); send the boxes per request instead"
        )
    if not args.detector:
        raise ValueError("mm_processor_kwargs.proposer needs --detector (an OWLv2 folder)")
    return proposer_from_args(args, "cpu")


class MGLlavaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MGLlavaConfig:
        return self.ctx.get_hf_config(MGLlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> MGLlavaProcessor:
        """vLLM's cached processor of the folder, with the startup `proposer` built from its flags (once) and
        set on the processor (the image processor holds no detector)."""
        processor = self.ctx.get_hf_processor(MGLlavaProcessor)
        flags = self._startup_kwargs().get(KWARG_PROPOSER)
        if flags is not None and processor.proposer is None:
            processor.proposer = build_proposer(flags)
        return processor

    def _startup_kwargs(self) -> Mapping[str, Any]:
        return self.ctx.get_mm_config().mm_processor_kwargs or {}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"images_kwargs": {KWARG_BOXES}}

    @property
    def uses_object_tokens(self) -> bool:
        return self.get_hf_processor().image_processor.use_object_tokens

    def max_boxes(self) -> int:
        """The most object rows one image may give (startup `mm_processor_kwargs["max_boxes"]`)."""
        value = self._startup_kwargs().get(KWARG_MAX_BOXES, MAX_BOXES)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"mm_processor_kwargs.max_boxes must be a positive integer, got {value!r}")
        return value if self.uses_object_tokens else 0

    def visual_rows(self, num_boxes: int) -> int:
        return self.get_hf_processor().visual_rows(1, num_boxes)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.visual_rows(self.max_boxes())}


class MGLlavaDummyInputsBuilder(BaseDummyInputsBuilder[MGLlavaProcessingInfo]):
    """`max_boxes` boxes on each dummy image, each with its own label so that NMS and the per-label cap keep
    them all: the profiling run sees the largest encoder output an image can give."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> dict:
        side = self.info.get_hf_processor().image_processor.high_res_size
        images = self._get_dummy_images(width=side, height=side, num_images=mm_counts.get("image", 0))
        return {"image": images}

    def dummy_boxes(self, num_images: int) -> list[dict[str, list]] | None:
        n = self.info.max_boxes()
        if n == 0:
            return None
        side = self.info.get_hf_processor().image_processor.high_res_size
        step = max(side // n, 1)
        xyxy = [[(i * step) % side, 0, (i * step) % side + step, side] for i in range(n)]
        record = {"boxes": xyxy, "scores": [1.0] * n, "labels": [f"dummy{i}" for i in range(n)]}
        return [record] * num_images


def boxes_per_image(value: Any, num_images: int) -> list[Any]:
    """`mm_processor_kwargs["boxes"]` -> one entry per image (None: no boxes); an error names the field."""
    if value is None:
        return [None] * num_images
    if not isinstance(value, (list, tuple)) or len(value) != num_images:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"mm_processor_kwargs.boxes must hold one entry per image ({num_images}), got {got}")
    return list(value)


def _plain(value: Any) -> Any:
    """Box entries given from Python may hold arrays or tensors (or our `Boxes`): their JSON for the cache key."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"boxes: cannot read a {type(value).__name__}")


class MGLlavaMultiModalProcessor(BaseMultiModalProcessor[MGLlavaProcessingInfo]):
    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> Any:
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        boxes = self.dummy_inputs.dummy_boxes(mm_counts.get("image", 0))
        if boxes is not None:
            inputs.hf_processor_mm_kwargs = {**inputs.hf_processor_mm_kwargs, KWARG_BOXES: boxes}
        return inputs

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        images = list(hf_data.get("images") or [])
        processor = self.info.get_hf_processor()
        image_processor = processor.image_processor
        boxes = boxes_per_image(hf_kwargs.get(KWARG_BOXES), len(images))
        if image_processor.use_object_tokens:
            boxes = processor.propose_boxes(images, boxes)  # the startup proposer's for images given none
        out = image_processor(images, boxes=boxes if image_processor.use_object_tokens else None)
        data = {"pixel_values": out["pixel_values"]}
        if "high_res_pixel_values" in out:  # absent for a model without the ConvNeXt (no fusion, no objects)
            data["high_res_pixel_values"] = out["high_res_pixel_values"]
        if image_processor.use_object_tokens:
            counts = out["object_counts"]
            limit = self.info.max_boxes()
            for i, n in enumerate(counts.tolist()):
                if n > limit:
                    raise ValueError(
                        f"image {i} keeps {n} boxes after selection but this server takes at most {limit} "
                        f"per image; start it with --mm-processor-kwargs '{{\"max_boxes\": {n}}}' or more"
                    )
            # integer pixels of the high-res frame: exact in any dtype vLLM casts floating tensors to
            data["object_boxes"] = out["object_boxes"].round().long()
            data["object_counts"] = counts
        return BatchFeature(data)

    def _get_mm_hashes(self, inputs: Any) -> dict[str, list[str]]:
        """vLLM keys each image on the request's whole `mm_processor_kwargs`, which pairs an image with the list
        of every image's boxes: two requests with the same list but the images in another order would share an
        image's cached rows. Here each image's key covers its own boxes entry instead of the list."""
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        boxes = kwargs.pop(KWARG_BOXES, None)
        hashes = dict(super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=kwargs)))
        if "image" in hashes:
            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
            entries = boxes_per_image(boxes, len(hashes["image"]))
            hashes["image"] = [
                MultiModalHasher.hash_kwargs(algorithm, image=key, boxes=json.dumps(entry, default=_plain))
                for key, entry in zip(hashes["image"], entries, strict=True)
            ]
        return hashes

    def _get_cache_missing_processor_kwargs(
        self, inputs: Any, mm_is_cached: Mapping[str, list[bool]]
    ) -> Mapping:
        """Only the boxes of the images that are processed now (those the cache misses), in their order."""
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        cached = mm_is_cached.get("image", [])
        if kwargs.get(KWARG_BOXES) is not None and any(cached):
            boxes = boxes_per_image(kwargs[KWARG_BOXES], len(cached))
            kwargs[KWARG_BOXES] = [b for b, hit in zip(boxes, cached, strict=True) if not hit]
        return kwargs

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = {"pixel_values": MultiModalFieldConfig.batched("image")}
        if "high_res_pixel_values" in hf_inputs:
            fields["high_res_pixel_values"] = MultiModalFieldConfig.batched("image")
        if "object_counts" in hf_inputs:
            counts = hf_inputs["object_counts"]
            fields["object_boxes"] = MultiModalFieldConfig.flat_from_sizes("image", counts)
            fields["object_counts"] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        token_id = self.info.get_hf_config().image_token_id

        def rows(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            counts = item.get("object_counts")
            boxes = int(counts.data) if counts is not None else 0
            return [token_id] * self.info.visual_rows(boxes)

        return [PromptReplacement(modality="image", target=[token_id], replacement=rows)]

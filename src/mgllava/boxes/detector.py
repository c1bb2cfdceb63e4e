"""OWLv2 open-vocabulary detector: images + tags -> `Boxes` in original-image pixels (docs/design.md section 7).

Per image: queries `prompt.format(tag=t)` ("a photo of {tag}", the reference's), OWLv2 class logits
(B, P, Q) over the P patches, score = sigmoid(max over queries), label = the best query's tag, keep
score > `threshold` (0.2). Boxes: OWLv2's (cx, cy, w, h) in [0, 1] of the padded square (the processor pads
bottom/right to a square, then resizes to 960) -> xyxy * max(width, height): original pixels, the same
scaling as the reference's `post_process_object_detection(target_sizes=[[max_wh, max_wh]])`. Boxes are not
clipped to the image (neither were the reference's); `prepare_boxes` clips them in the model's frame.

Determinism: text prompts are always encoded in chunks of TEXT_CHUNK rows, so a tag's embedding does not
depend on the order tags are met. Image batches are not padded: a box file made with 2 ranks equals a
1-process file when the kernels give a row the same result whatever the batch size (true on CPU in our
tests; use `batch_size=1` where bitwise equality matters more than speed).

How it is faster than calling the model as the reference did (`model(**processor(text, images))` per
image): query embeddings are computed once per tag and cached (an LRU of `cache_size` tags), and only the
vision tower runs per image, batched over `batch_size` images with their (possibly different) tag sets
padded and masked. Logits and boxes are those of `Owlv2ForObjectDetection.forward`: this composes its own
`image_embedder`, `class_predictor` and `box_predictor` with the text path of `Owlv2Model.forward`.

Deviations: boxes keep sub-pixel floats (the reference truncated them with `.int()`); text queries longer
than the tokenizer's `model_max_length` (16 for OWLv2) are truncated instead of failing in the model.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image
from transformers.image_transforms import center_to_corners_format

from .types import Boxes

TEXT_CHUNK = 32  # prompts per text-encoder call


class Owlv2Detector:
    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        threshold: float = 0.2,
        prompt: str = "a photo of {tag}",
        batch_size: int = 4,
        cache_size: int = 16384,
    ) -> None:
        if "{tag}" not in prompt:
            raise ValueError(f"detector prompt {prompt!r} has no {{tag}} placeholder")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"detector threshold must be in [0, 1), got {threshold}")
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self.prompt = prompt
        self.batch_size = max(1, int(batch_size))
        self.cache_size = cache_size
        self._queries: OrderedDict[str, torch.Tensor] = OrderedDict()  # tag -> (D,) unit-norm embedding

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> Owlv2Detector:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        model = Owlv2ForObjectDetection.from_pretrained(str(path), dtype=dtype).to(device)
        return cls(model, Owlv2Processor.from_pretrained(str(path)), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def _encode(self, tags: list[str]) -> torch.Tensor:
        """(len(tags), D) text embeddings, normalised as `Owlv2Model.forward` does."""
        tokenizer = self.processor.tokenizer
        text = tokenizer(
            [self.prompt.format(tag=tag) for tag in tags],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        embeds = self.model.owlv2.get_text_features(**text).pooler_output
        return embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True)

    def query_embeddings(self, tags: list[str]) -> torch.Tensor:
        """(Q, D) for `tags`, each tag encoded once and then served from the cache."""
        missing = list(dict.fromkeys(t for t in tags if t not in self._queries))
        for start in range(0, len(missing), TEXT_CHUNK):
            chunk = missing[start : start + TEXT_CHUNK]
            # always TEXT_CHUNK rows: a tag's embedding does not depend on which tags share its batch
            padded = self._encode(chunk + [""] * (TEXT_CHUNK - len(chunk)))
            for tag, embedding in zip(chunk, padded[: len(chunk)], strict=True):
                self._queries[tag] = embedding
        for tag in tags:
            self._queries.move_to_end(tag)
        while len(self._queries) > max(self.cache_size, len(tags)):
            self._queries.popitem(last=False)
        return torch.stack([self._queries[t] for t in tags])

    def detect(self, images: list[Image.Image], tags: list[list[str]]) -> list[Boxes]:
        """Boxes per image (original pixels, `frame` = (width, height)); no tags -> no boxes."""
        if len(images) != len(tags):
            raise ValueError(f"detector got {len(images)} images but {len(tags)} tag lists")
        out = [Boxes.empty(image.size) for image in images]
        todo = [i for i, t in enumerate(tags) if t]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            found = self._detect_batch([images[i] for i in chunk], [tags[i] for i in chunk])
            for i, boxes in zip(chunk, found, strict=True):
                out[i] = boxes
        return out

    @torch.inference_mode()
    def _detect_batch(self, images: list[Image.Image], tags: list[list[str]]) -> list[Boxes]:
        # resize and normalise on the model's device (the torchvision backend runs there too)
        pixels = self.processor.image_processor(images, return_tensors="pt", device=self.device)[
            "pixel_values"
        ]
        feature_map, _ = self.model.image_embedder(pixel_values=pixels.to(self.device, self.dtype))
        b, h, w, d = feature_map.shape
        image_feats = feature_map.reshape(b, h * w, d)  # (B, P, D)
        width = max(len(t) for t in tags)
        queries = feature_map.new_zeros(b, width, self.model.config.projection_dim)  # (B, Q, D')
        mask = torch.zeros(b, width, dtype=torch.bool, device=self.device)
        for row, row_tags in enumerate(tags):
            queries[row, : len(row_tags)] = self.query_embeddings(row_tags).to(queries.dtype)
            mask[row, : len(row_tags)] = True
        logits, _ = self.model.class_predictor(image_feats, queries, mask)  # (B, P, Q) float32
        boxes = center_to_corners_format(
            self.model.box_predictor(image_feats, feature_map).float()
        )  # (B, P, 4)
        best = logits.max(dim=-1)
        scores = torch.sigmoid(best.values)  # (B, P)
        out = []
        for row, image in enumerate(images):
            keep = (scores[row] > self.threshold).nonzero().flatten()
            side = float(max(image.size))
            out.append(
                Boxes(
                    (boxes[row, keep] * side).cpu(),
                    scores[row, keep].cpu(),
                    [tags[row][q] for q in best.indices[row, keep].tolist()],
                    image.size,
                )
            )
        return out

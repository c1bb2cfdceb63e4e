"""Taggers: images -> English tags, the text queries of the open-vocabulary detector (docs/design.md section 7).

Every tagger has one method, `tags(images) -> list[list[str]]`: for each RGB `PIL.Image`, its tags, best
first, without duplicates. An empty list is a legitimate answer ("nothing recognised"); the detector then
proposes no box for that image and the box file records `"tags": []`.

- `FixedTagger(tags)`: the same tags for every image - a user-given list, or a packaged vocabulary
  (`FixedTagger.from_vocabulary("coco80")` is the paper's COCO-80 ablation).
- `ClipTagger`: zero-shot CLIP (transformers `CLIPModel`). Tag probabilities are the softmax over the
  vocabulary of `logit_scale * cos(image, text(prompt.format(tag=t)))`; tags with probability >= `threshold`
  are kept, at most `top_k`. Text embeddings of the whole vocabulary are computed once, at construction.
- `RamPlusTagger`: RAM++ (Swin-L, 384 px), the reference's tagger, through the `recognize-anything`
  package (not on PyPI; imported only when used). A thin adapter over that package's own `inference_ram`,
  written from the reference's script; it cannot be tested here without the package and its weights.

Vocabularies ship in `mgllava/assets/vocab/`: `coco80` (the 80 COCO names) and `lvis` (the 1203 LVIS v1
category names). A vocabulary file has one tag per line; `#` lines are comments; `_` reads as a space.

Deviation from the reference: it only ever used RAM++. CLIP zero-shot tags over LVIS are our default
because they run from a `transformers` checkpoint; they are a different tagger and give different boxes.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

logger = logging.getLogger(__name__)

PACKAGED_VOCABULARIES = {"coco80": "coco80.txt", "lvis": "lvis_v1.txt"}
RAM_INSTALL = (
    "RAM++ needs the `recognize-anything` package, which is not on PyPI: "
    "pip install git+https://github.com/xinyu1205/recognize-anything.git "
    "and download its checkpoint ram_plus_swin_large_14m.pth"
)


class Tagger(Protocol):
    def tags(self, images: list[Image.Image]) -> list[list[str]]: ...


def unique(tags: list[str]) -> list[str]:
    """Stripped, non-empty, first occurrence kept."""
    seen: dict[str, None] = {}
    for tag in tags:
        tag = " ".join(str(tag).split())
        if tag:
            seen.setdefault(tag, None)
    return list(seen)


def load_vocabulary(name_or_path: str | Path) -> list[str]:
    """A packaged vocabulary (`coco80`, `lvis`) or a text file with one tag per line."""
    if str(name_or_path) in PACKAGED_VOCABULARIES:
        source = resources.files("mgllava") / "assets" / "vocab" / PACKAGED_VOCABULARIES[str(name_or_path)]
        text = source.read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocabulary {str(name_or_path)!r}: neither a packaged vocabulary "
                f"({', '.join(PACKAGED_VOCABULARIES)}) nor a file"
            )
        text = path.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    tags = unique([line.replace("_", " ") for line in lines if line and not line.startswith("#")])
    if not tags:
        raise ValueError(f"vocabulary {str(name_or_path)!r} has no tags")
    return tags


class FixedTagger:
    """The same tags for every image."""

    def __init__(self, tags: list[str]) -> None:
        self.vocabulary = unique(list(tags))
        if not self.vocabulary:
            raise ValueError("the tag list is empty: give at least one tag")

    @classmethod
    def from_vocabulary(cls, name_or_path: str | Path) -> FixedTagger:
        return cls(load_vocabulary(name_or_path))

    def tags(self, images: list[Image.Image]) -> list[list[str]]:
        return [list(self.vocabulary) for _ in images]


class ClipTagger:
    """Zero-shot CLIP tags (module docstring). `model` is a `CLIPModel`, `processor` its `CLIPProcessor`."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        vocabulary: list[str],
        prompt: str = "a photo of a {tag}.",
        threshold: float = 0.05,
        top_k: int = 10,
        batch_size: int = 32,
    ) -> None:
        if "{tag}" not in prompt:
            raise ValueError(f"tagger prompt {prompt!r} has no {{tag}} placeholder")
        if top_k < 1 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"tagger needs top_k >= 1 and 0 <= threshold <= 1, got {top_k}, {threshold}")
        self.model = model.eval()
        self.processor = processor
        self.vocabulary = unique(list(vocabulary))
        if not self.vocabulary:
            raise ValueError("the tagger's vocabulary is empty")
        self.prompt = prompt
        self.threshold = threshold
        self.top_k = top_k
        self.batch_size = batch_size
        self.text_embeddings = self._embed_vocabulary()  # (T, D), unit norm

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        vocabulary: str | Path | list[str] = "lvis",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> ClipTagger:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(str(path), dtype=dtype).to(device)
        processor = CLIPProcessor.from_pretrained(str(path))
        tags = vocabulary if isinstance(vocabulary, list) else load_vocabulary(vocabulary)
        return cls(model, processor, tags, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def _embed_vocabulary(self) -> torch.Tensor:
        prompts = [self.prompt.format(tag=tag) for tag in self.vocabulary]
        parts = []
        for start in range(0, len(prompts), 256):
            text = self.processor.tokenizer(
                prompts[start : start + 256], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            parts.append(self.model.get_text_features(**text).pooler_output.float())
        embeddings = torch.cat(parts)  # (T, D)
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, T) softmax over the vocabulary, float32."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor(
                images[start : start + self.batch_size], return_tensors="pt"
            )
            pixel_values = pixels["pixel_values"].to(self.device, self.model.dtype)
            image = self.model.get_image_features(pixel_values=pixel_values).pooler_output.float()
            image = image / image.norm(dim=-1, keepdim=True)
            logits = self.model.logit_scale.exp().float() * image @ self.text_embeddings.T  # (b, T)
            out.append(logits.softmax(dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.vocabulary))

    def tags(self, images: list[Image.Image]) -> list[list[str]]:
        result = []
        for probs in self.probabilities(images):
            values, order = torch.sort(probs, descending=True, stable=True)
            keep = order[: self.top_k][values[: self.top_k] >= self.threshold]
            result.append([self.vocabulary[i] for i in keep.tolist()])
        return result


def parse_ram_tags(text: str) -> list[str]:
    """RAM++'s English output `"tag a | tag b | ..."` -> tags, as the reference's script parsed it."""
    return unique([tag.strip() for tag in text.replace(" |", ",").lower().strip().split(",")])


class RamPlusTagger:
    """RAM++ through `recognize-anything` (module docstring); one image at a time, as the reference ran it."""

    def __init__(
        self, checkpoint: str | Path, image_size: int = 384, device: str | torch.device = "cpu"
    ) -> None:
        try:
            from ram import get_transform, inference_ram
            from ram.models import ram_plus
        except ImportError as err:
            raise ImportError(RAM_INSTALL) from err
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"RAM++ checkpoint {str(checkpoint)!r}: no such file")
        self.device = torch.device(device)
        self.model = (
            ram_plus(pretrained=str(checkpoint), image_size=image_size, vit="swin_l").eval().to(device)
        )
        self.transform = get_transform(image_size=image_size)
        self._inference = inference_ram

    @torch.inference_mode()
    def tags(self, images: list[Image.Image]) -> list[list[str]]:
        out = []
        for image in images:
            english = self._inference(self.transform(image).unsqueeze(0).to(self.device), self.model)[0]
            out.append(parse_ram_tags(english))
        return out

"""`MGLlavaProcessor`: text, conversations, images and boxes -> model inputs (docs/design.md sections 2, 5, 6).

Two ways in:
- `processor(text=..., images=..., boxes=...)`: raw text; each `<image>` takes the next image. BOS is
  prepended as the tokenizer would, the text is tokenised in pieces around each `<image>` (as the
  reference does) and every `<image>` becomes `num_image_tokens + n_i` placeholder tokens.
- `processor.apply_chat_template(messages, tokenize=True, return_dict=True, images=..., boxes=...)`: the
  exact reference encoding of a conversation through the model's chat template (`data.templates`), with
  training `labels`; `tokenize=False` returns the prompt text rendered by the processor's Jinja `chat_template`
  (saved with the processor as `chat_template.jinja`, generated from the named template, so a plain HF user's
  `apply_chat_template` renders it too; its one tokenisation equals the Python encoding except where the
  tokenizer merges across the reference's piece boundaries: docs/design.md section 6.6).

Batches are padded on `padding_side` ("left" for generation, "right" for training) with real attention
masks. Sequences longer than their budget are an error, or with `truncation=True` lose text tokens from
the end - placeholder rows are never cut (the reference re-checked nothing after inserting them). The
budget is `max_length` (2048 in the paper presets), or `video_max_length` for a sample that holds a video:
8 frames are 8 x (576 + n) >= 4,616 visual rows, so a video model sets a longer one (see the
`mgllava-vicuna-7b-video` preset); unset, videos get `max_length` too.
"""

from __future__ import annotations

import base64
import logging
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs, Unpack

from ..media.images import load_image
from ..model.configuration import APPENDS_ROWS, MGLlavaConfig, load_preset
from .image_processor import MGLlavaImageProcessor
from .templates import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    IMAGE_TOKEN,
    TEMPLATES,
    VIDEO_MARKER,
    VIDEO_TOKEN,
    check_tokenizer,
    encode_turns,
    encode_with_markers,
    get_template,
    jinja_chat_template,
    stop_token_ids,
    to_turns,
)

logger = logging.getLogger(__name__)


def packaged_tokenizer_path(name: str = "tiny_tokenizer") -> str:
    return str(resources.files("mgllava") / "assets" / name)


def _image_from_part(part: dict[str, Any]) -> Any:
    """The image payload of an HF/OpenAI content part: a path, PIL image, bytes or a base64 data URL."""
    if part.get("type") == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
    else:
        value = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
    if value is None:
        raise ValueError(f"image part without an image: {sorted(part)}")
    if isinstance(value, str) and value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            raise ValueError("image data URLs must be base64-encoded (data:image/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as err:
            raise ValueError(f"image data URL is not valid base64: {err}") from err
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise ValueError("image URLs are not fetched; pass a file path, bytes or a base64 data URL")
    return value


def images_in_messages(messages: list[dict[str, Any]]) -> list[Any]:
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            found += [
                _image_from_part(p)
                for p in content
                if isinstance(p, dict) and p.get("type") in ("image", "image_url")
            ]
    return found


class MGLlavaProcessorKwargs(ProcessingKwargs, total=False):
    """The keyword arguments `MGLlavaProcessor.__call__` takes, merged as transformers merges every processor's
    (`_merge_kwargs`: flat, or per modality as `text_kwargs={...}`). Of the text options, the processor
    honours `add_special_tokens`, `truncation` (to the sequence budget, never cutting placeholder rows) and
    `padding_side` (default: the processor's); batches are always padded to their longest sample."""

    _defaults = {
        "text_kwargs": {"add_special_tokens": True, "truncation": False},
        "common_kwargs": {"return_tensors": "pt"},
    }


HONOURED_TEXT_KWARGS = ("add_special_tokens", "truncation", "padding_side", "return_tensors")


def _text_options(text_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The merged text options we honour; any other one set to a value is refused, naming it."""
    ignored = {
        k: v for k, v in text_kwargs.items() if k not in HONOURED_TEXT_KWARGS and v not in (None, False)
    }
    if ignored:
        raise ValueError(
            f"MGLlavaProcessor does not support the text option(s) {sorted(ignored)}: it takes "
            f"{', '.join(HONOURED_TEXT_KWARGS)} (the sequence budget is the processor's max_length)"
        )
    if text_kwargs["truncation"] not in (True, False):
        raise ValueError(f"truncation must be True or False, got {text_kwargs['truncation']!r}")
    return {k: text_kwargs.get(k) for k in HONOURED_TEXT_KWARGS}


class MGLlavaProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor: MGLlavaImageProcessor | None = None,
        tokenizer: Any = None,
        template: str = "vicuna",
        num_image_tokens: int = 576,
        max_length: int = 2048,
        video_max_length: int | None = None,
        image_token: str = IMAGE_TOKEN,
        padding_side: str = "left",
        object_rows: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_tokenizer(tokenizer, get_template(template))
        self.template = template
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        self.video_max_length = None if video_max_length is None else int(video_max_length)
        self.image_token = image_token
        self.padding_side = padding_side
        self.object_rows = bool(object_rows)  # False when the model mixes objects into image rows (f2b)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token first")
        chat_template = chat_template or jinja_chat_template(get_template(template))
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        # Optional `boxes.BoxProposer` (box file, then detector) for images given without boxes (None). Runtime
        # state, not a constructor argument, so `save_pretrained` leaves it out; the image processor has none.
        self.proposer: Any = None

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, tokenizer: Any = None, **overrides: Any) -> MGLlavaProcessor:
        """Processor of a named preset. `tiny` uses the packaged tokenizer; the paper presets load the LLM's
        tokenizer from `tokenizer` (a folder, hub id or tokenizer object; default: the preset's hub id)."""
        preset = load_preset(name)
        config = MGLlavaConfig.from_preset(name)
        spec = preset["processor"]
        source = tokenizer if tokenizer is not None else spec["tokenizer"]
        if source == "tiny":
            source = packaged_tokenizer_path()
        tok = _load_tokenizer(source) if isinstance(source, (str, Path)) else source
        settings = {k: spec[k] for k in ("template", "max_length", "video_max_length") if k in spec}
        return cls.for_config(config, tok, **{**settings, **overrides})

    @classmethod
    def for_config(
        cls, config: MGLlavaConfig, tokenizer: Any, template: str, **overrides: Any
    ) -> MGLlavaProcessor:
        """Processor matching a model config: image sizes, object tokens and the placeholder id. A config with a
        `context_length` gives videos that budget unless `video_max_length` is passed."""
        ensure_image_token(tokenizer, config.image_token_id)
        if config.context_length is not None:
            overrides.setdefault("video_max_length", config.context_length)
        image_processor = MGLlavaImageProcessor(
            low_res_size=config.vision_config.image_size,
            high_res_size=config.high_res_config.image_size,
            use_object_tokens=config.object_tokens != "off",
            use_high_res=config.uses_high_res,
            **{
                k: overrides.pop(k)
                for k in list(overrides)
                if k.startswith("box_") or k in ("max_image_pixels",)
            },
        )
        return cls(
            image_processor,
            tokenizer,
            template=template,
            num_image_tokens=config.num_image_tokens,
            object_rows=APPENDS_ROWS[config.object_tokens],
            **overrides,
        )

    @property
    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, get_template(self.template))

    def answer_ids(self, token_ids: Any) -> tuple[list[int], bool]:
        """Generated ids (prompt excluded) up to the first of the template's stop tokens, and whether one came:
        the one rule for where an answer ends (decoding, the engines' results, `decode_answer`)."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        stops = set(self.stop_token_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        return (ids, False) if end is None else (ids[:end], True)

    def visual_rows(self, frames: int, boxes: int) -> int:
        """Placeholder tokens of an image (`frames` = 1) or a video: `num_image_tokens` per frame, plus one row
        per box when object tokens get rows of their own."""
        return frames * self.num_image_tokens + (boxes if self.object_rows else 0)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    # -- encoding -----------------------------------------------------------------------------------------
    def _visual_features(
        self,
        markers: list[int],
        images: list[Any],
        image_boxes: list[Any] | None,
        videos: list[Any],
        video_boxes: list[Any] | None,
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Tensors of the sample's images and videos in the order of their tags, and the visual rows of each
        tag (an image: num_image_tokens + its boxes; a video: that, summed over its frames)."""
        queues = {
            IMAGE_MARKER: iter(zip(images, self.propose_boxes(images, image_boxes), strict=True)),
            VIDEO_MARKER: iter(zip(videos, video_boxes or [None] * len(videos), strict=True)),
        }
        parts, rows = [], []
        for marker in markers:
            item, boxes = next(queues[marker])
            if marker == IMAGE_MARKER:
                features = dict(self.image_processor([item], boxes=[boxes]))
            else:
                features = self.image_processor.video(item, boxes)
            counts = features.get("object_counts")
            rows.append(
                self.visual_rows(
                    features["pixel_values"].shape[0], int(counts.sum()) if counts is not None else 0
                )
            )
            parts.append(features)
        return _concat(parts), rows

    def propose_boxes(self, images: list[Any], boxes: list[Any] | None) -> list[Any]:
        """Each image's boxes, those not given (None) filled by the proposer in one batch when one is set."""
        boxes = list(boxes) if boxes is not None else [None] * len(images)
        missing = [i for i, b in enumerate(boxes) if b is None]
        if self.proposer is None or not self.image_processor.use_object_tokens or not missing:
            return boxes
        ip = self.image_processor
        rgbs = [load_image(images[i], ip.max_image_pixels, ip.apply_exif) for i in missing]
        for i, found in zip(missing, self.proposer([images[i] for i in missing], rgbs), strict=True):
            boxes[i] = found
        return boxes

    def _expand(self, ids: list[int], labels: list[int] | None, rows: list[int], truncation: bool):
        """Replace each image/video marker by its run of placeholder tokens, then enforce the budget."""
        out_ids: list[int] = []
        out_labels: list[int] = []
        runs = iter(rows)
        for k, token in enumerate(ids):
            if token in (IMAGE_MARKER, VIDEO_MARKER):
                n = next(runs)
                out_ids += [self.image_token_id] * n
                out_labels += [IGNORE_INDEX] * n
            else:
                out_ids.append(token)
                out_labels.append(labels[k] if labels is not None else IGNORE_INDEX)
        return self._fit(out_ids, out_labels, truncation, VIDEO_MARKER in ids)

    def budget(self, has_video: bool) -> tuple[int, str]:
        """(token budget, its setting's name) of a sample with or without a video."""
        if has_video and self.video_max_length is not None:
            return self.video_max_length, "video_max_length"
        return self.max_length, "max_length"

    def _fit(
        self, ids: list[int], labels: list[int], truncation: bool, has_video: bool = False
    ) -> tuple[list[int], list[int], int]:
        limit, name = self.budget(has_video)
        excess = len(ids) - limit
        if excess <= 0:
            return ids, labels, 0
        visual = sum(1 for t in ids if t == self.image_token_id)
        if not truncation or visual > limit:
            hint = "; pass truncation=True to cut text" if not truncation and visual <= limit else ""
            if has_video and self.video_max_length is None:
                hint += (
                    "; videos need a longer budget (video_max_length), which video models set (preset "
                    "mgllava-vicuna-7b-video, or `mgllava assemble --context-length`)"
                )
            raise ValueError(
                f"sequence of {len(ids)} tokens ({visual} visual rows, {len(ids) - visual} text) exceeds "
                f"{name} {limit}{hint}"
            )
        drop = set()
        for pos in range(len(ids) - 1, -1, -1):
            if len(drop) == excess:
                break
            if ids[pos] != self.image_token_id:
                drop.add(pos)
        logger.warning("truncated %d text tokens to fit %s %d (visual rows kept)", excess, name, limit)
        keep = [i for i in range(len(ids)) if i not in drop]
        return [ids[i] for i in keep], [labels[i] for i in keep], excess

    def _encode(
        self, ids: list[int], labels: list[int] | None, visuals: Visuals, truncation: bool
    ) -> dict[str, Any]:
        markers = [t for t in ids if t in (IMAGE_MARKER, VIDEO_MARKER)]
        features, rows = self._visual_features(markers, *visuals)
        ids, labels, cut = self._expand(ids, labels, rows, truncation)
        return {"input_ids": ids, "labels": labels, "truncated": cut, **features}

    def _batch(self, encoded: list[dict[str, Any]], with_labels: bool, side: str | None) -> dict[str, Any]:
        side = side or self.padding_side
        input_ids, mask = pad_batch([e["input_ids"] for e in encoded], self.pad_token_id, side)
        data = {"input_ids": input_ids, "attention_mask": mask}
        if with_labels:
            data["labels"] = pad_batch([e["labels"] for e in encoded], IGNORE_INDEX, side)[0]
        data.update(_concat(encoded))
        return data

    def collate(self, encoded: list[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Samples from `encode_conversation` -> one padded training batch with labels."""
        return self._batch(encoded, True, padding_side)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        boxes: Any = None,
        videos: list[Any] | None = None,
        video_boxes: list[Any] | None = None,
        **kwargs: Unpack[MGLlavaProcessorKwargs],
    ) -> BatchFeature:
        """Raw text with `<image>` / `<video>` tags; images (and videos) are taken in tag order. Options
        (`MGLlavaProcessorKwargs`): `add_special_tokens`, `truncation`, `padding_side`, `return_tensors`."""
        merged = self._merge_kwargs(MGLlavaProcessorKwargs, **kwargs)
        options = _text_options(merged["text_kwargs"])
        add_special_tokens, truncation = options["add_special_tokens"], options["truncation"]
        padding_side, return_tensors = options["padding_side"], options["return_tensors"]
        texts = [text] if isinstance(text, str) else list(text or [])
        single = not isinstance(images, (list, tuple)) and images is not None
        image_list = [images] if single else list(images or [])
        box_list = [boxes] if single and boxes is not None else boxes
        bos = (
            [self.tokenizer.bos_token_id]
            if add_special_tokens and self.tokenizer.bos_token_id is not None
            else []
        )
        ids = [bos + encode_with_markers(self.tokenizer, t) for t in texts]
        groups = split_visuals(ids, image_list, box_list, videos, video_boxes, "the text")
        encoded = [
            self._encode(seq, None, visuals, truncation) for seq, visuals in zip(ids, groups, strict=True)
        ]
        return BatchFeature(
            data=self._batch(encoded, False, padding_side) if encoded else {}, tensor_type=return_tensors
        )

    def encode_conversation(
        self,
        messages: list[dict[str, Any]],
        images: list[Any] | None = None,
        boxes: list[Any] | None = None,
        videos: list[Any] | None = None,
        video_boxes: list[Any] | None = None,
        add_generation_prompt: bool = False,
        truncation: bool = True,
    ) -> dict[str, Any]:
        """One conversation -> {input_ids, labels (lists), truncated (int), visual tensors}."""
        images = list(images) if images is not None else images_in_messages(messages)
        system, turns = to_turns(messages)
        if not add_generation_prompt and turns[-1].output is None:
            turns = turns[:-1]
            if not turns:
                raise ValueError("the conversation has no answered turn to train on")
        ids, labels = encode_turns(self.tokenizer, get_template(self.template), turns, system)
        (visuals,) = split_visuals([ids], images, boxes, videos, video_boxes, "the conversation")
        return self._encode(ids, labels, visuals, truncation)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        images: list[Any] | None = None,
        boxes: list[Any] | None = None,
        videos: list[Any] | None = None,
        video_boxes: list[Any] | None = None,
        padding_side: str | None = None,
        truncation: bool = False,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> Any:
        """The model's chat template (docs/design.md section 6). `tokenize=False`: the text, rendered by the Jinja
        `chat_template` (BOS and EOS written where the encoding puts them; `chat_template` may name one of our
        templates or be Jinja). `tokenize=True` gives the exact token sequence through the Python encoding
        (`encode_turns`, pieces tokenised separately as the reference does); with `return_dict=True` a padded
        batch with `labels` and the visual tensors."""
        batched = bool(conversation) and isinstance(conversation[0], list)
        convs = conversation if batched else [conversation]
        if not tokenize:
            rendered = [self._render(conv, chat_template, add_generation_prompt) for conv in convs]
            return rendered if batched else rendered[0]
        get_template(
            chat_template or self.template
        )  # an unknown name is refused here too (ids: self.template)
        if images is None:
            images = [i for conv in convs for i in images_in_messages(conv)]
        tags = [
            [IMAGE_MARKER] * _count(conv, IMAGE_TOKEN) + [VIDEO_MARKER] * _count(conv, VIDEO_TOKEN)
            for conv in convs
        ]
        groups = split_visuals(tags, images, boxes, videos, video_boxes, "the conversations")
        encoded = [
            self.encode_conversation(
                conv, *visuals, add_generation_prompt=add_generation_prompt, truncation=truncation
            )
            for conv, visuals in zip(convs, groups, strict=True)
        ]
        if not return_dict:
            ids = [e["input_ids"] for e in encoded]
            return ids if batched else ids[0]
        return BatchFeature(data=self._batch(encoded, True, padding_side), tensor_type=return_tensors)

    def _render(
        self, conv: list[dict[str, Any]], chat_template: str | None, add_generation_prompt: bool
    ) -> str:
        to_turns(conv)  # the messages are checked as for encoding: the same errors, not a silent skip
        if chat_template in TEMPLATES:
            chat_template = jinja_chat_template(TEMPLATES[chat_template])
        return self.tokenizer.apply_chat_template(
            conv,
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def decode_answer(self, token_ids: Any) -> str:
        """Generated ids (prompt excluded) -> answer text, stopping at the template's stop tokens."""
        return self.tokenizer.decode(self.answer_ids(token_ids)[0], skip_special_tokens=True).strip()


def pad_batch(sequences: list[list[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) int64 of `sequences` padded with `value` on `side` ("left" or "right"), and the (B, L) mask of
    their real positions: the one padding rule of training batches, generation and the engine."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _load_tokenizer(source: str | Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except OSError as err:
        raise ValueError(
            f"tokenizer {str(source)!r} is not available here ({err.__class__.__name__}); download the LLM once "
            "and pass tokenizer=<its folder>"
        ) from err


class Visuals(NamedTuple):
    """The images and videos of one sample, in tag order, with their boxes (None: no boxes given)."""

    images: list[Any]
    image_boxes: list[Any] | None
    videos: list[Any]
    video_boxes: list[Any] | None


def _count(conv: list[dict[str, Any]], tag: str) -> int:
    _, turns = to_turns(conv)
    return sum(t.input.count(tag) for t in turns)


def _groups(counts: list[int], items: list[Any], boxes: list[Any] | None, kind: str, where: str):
    if sum(counts) != len(items):
        raise ValueError(f"{where} has {sum(counts)} <{kind}> tags but {len(items)} {kind}s were given")
    if boxes is not None and len(boxes) != len(items):
        raise ValueError(f"got boxes for {len(boxes)} {kind}s but {len(items)} {kind}s were given")
    out, start = [], 0
    for n in counts:
        out.append((items[start : start + n], None if boxes is None else boxes[start : start + n]))
        start += n
    return out


def split_visuals(
    token_lists: list[list[int]],
    images: list[Any] | None,
    image_boxes: list[Any] | None,
    videos: list[Any] | None,
    video_boxes: list[Any] | None,
    where: str,
) -> list[Visuals]:
    """Distribute flat image/video lists over samples by the tags (markers) each sample holds."""
    img = _groups(
        [t.count(IMAGE_MARKER) for t in token_lists], list(images or []), image_boxes, "image", where
    )
    vid = _groups(
        [t.count(VIDEO_MARKER) for t in token_lists], list(videos or []), video_boxes, "video", where
    )
    return [Visuals(i, ib, v, vb) for (i, ib), (v, vb) in zip(img, vid, strict=True)]


def _concat(parts: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("pixel_values", "high_res_pixel_values", "object_boxes", "object_counts"):
        tensors = [p[key] for p in parts if key in p]
        if tensors:
            out[key] = torch.cat(tensors)
    return out


def ensure_image_token(tokenizer: Any, image_token_id: int) -> None:
    """Make `<image>` a special token of `tokenizer` with id `image_token_id` (added if missing)."""
    current = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if current is None or current == tokenizer.unk_token_id:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
        )
        current = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if current != image_token_id:
        raise ValueError(
            f"the tokenizer maps {IMAGE_TOKEN} to id {current} but the model config expects image_token_id "
            f"{image_token_id}; use the tokenizer the model was built with"
        )

"""The inference engine: conversations and images in, answers (text or a stream of text) out.

    messages + images/video (+ user boxes | proposer) --prepare--> Prepared: prompt ids, one Frame per image
        or video frame (its tensors, visual row count and a content key), the boxes used in original pixels
    [Prepared, ...] --generate--> visual rows per Frame (cached by key, missing ones encoded in one
        `get_image_features` call) --> decoding (below) --> per-row text, streamed through `on_text`
        callbacks as it is decoded

- Scheduling. "continuous" (the default): `decoding.RunningBatch` decodes requests one token per step over a
  batched KV cache that requests join as soon as their prompts are computed (in chunks inside the same
  steps, within `max_step_tokens` per step: `packed`) and leave as soon as they finish;
  the `Batcher` admits a request that arrives mid-generation at the next step. Any sampling settings share a
  batch (each row picks its own tokens). "static": one left-padded `model.generate(mm_encoder_outputs=...)`
  per batch of requests with the same sampling settings; a request arriving mid-batch waits for the whole
  batch. In both, each row keeps its own `max_new_tokens` and stops at the template's stop token, and greedy
  answers are identical to running each request alone (and to the model's own `generate`; left padding with
  real attention masks, as `tests/model/test_modeling.py` checks).
- Reuse: a Frame's key is a digest of its pixel tensors and boxes, so the images of a conversation are
  encoded once and every later turn (which re-sends the whole conversation) reuses their visual rows.
  Continuous scheduling also keeps the KV cache of finished requests (`prefix.PrefixCache`, LRU by bytes):
  a later turn whose prompt extends an earlier turn's sequence prefills only its new tokens. Proposed boxes
  are cached by the proposer (by content).
- Boxes: user boxes (original pixels) win; else the optional `proposer` (`boxes.BoxProposer`: a box file
  looked up by the one rule of `boxes.lookup`, then tagger + OWLv2, with its own cache); else none (the
  model then sees its zero-box fallback row, as the reference). Each image reports where its boxes came
  from (`request`, `box_file`, `proposer`, `missing` when a box file without detector lacks the image, or
  `none`) and the boxes that became object tokens (after NMS and capping) in its pixels, as the image
  processor selects them (`MGLlavaImageProcessor.used_boxes`). `box_settings` sets the image processor's
  `box_*` fields (NMS IoU, limit, cap) for this engine, e.g. a benchmark's reference settings in `mgllava eval`.

The engine knows nothing of HTTP or terminals: errors in the caller's input are `EngineInputError`
(a `ValueError` naming the input, with a `param` and a machine-readable `code`); a request that fails while
it runs fails alone (`requests.RequestFailed`; the rows beside it finish as they would have without it).

Bounded work and locks: a prompt's text is counted in characters before it is tokenised
(`max_message_chars` per message, `max_prompt_chars` per request; by default `CHARS_PER_TOKEN` times the
context: prose averages about 4 characters a token, so a refused prose text could not have fit, though a
text of long repeated runs that a tokenizer packs into single tokens can be refused while it would fit).
Tokenising a prompt holds the preparation tokenizer's lock; decoding answers (the decode loop's
detokeniser) uses a copy of the tokenizer with a lock of its own, so a long prompt being tokenised never
stalls a decode step.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..boxes import Boxes, BoxProposer
from ..boxes.lookup import ImageKey
from ..data.processor import images_in_messages, pad_batch
from ..media.images import ImageError, ImageTooLarge, load_image
from ..media.video import VideoError
from ..model.generation import configure_generation
from ..utils.dtypes import resolve_dtype
from .attention import decode_kernel_on, enable_decode_kernel, warm_decode_kernel
from .cache import LRUCache, digest
from .decoding import MAX_STEP_TOKENS, Request, RunningBatch
from .linear import pack_linears
from .packed import install as install_packed
from .prefix import MIN_REUSE, PrefixCache
from .requests import (
    ChatResult,
    EngineInputError,
    Frame,
    GenerationSettings,
    Prepared,
    VisualBoxes,
    failed,
)
from .sampling import RowRules
from .streaming import BatchStreamer, Detokenizer, RowLimits, TextCallback, TextStream

__all__ = ["ChatResult", "ChatStream", "Engine", "EngineInputError", "Frame", "GenerationSettings", "Prepared",
           "VisualBoxes"]  # fmt: skip

logger = logging.getLogger(__name__)
ORIGINS = {"box_file": "box_file", "detector": "proposer", "missing": "missing"}  # Proposal.source -> report
BOX_SETTINGS = ("box_nms_iou", "box_limit", "box_cap", "box_per_label", "box_empty_fallback", "invalid_boxes")

FRAME_KEYS = ("pixel_values", "high_res_pixel_values", "object_boxes", "object_counts")
SCHEDULING = ("continuous", "static")
CHARS_PER_TOKEN = 16  # default text bound per context token: 4x prose's ~4 characters a token
# generation-config settings that change the chosen tokens, which continuous decoding does not apply (`generate`
# does), with their neutral values; a config setting one otherwise must be served with scheduling="static"
UNSUPPORTED_GENERATION = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                              min_length=0, min_new_tokens=0, guidance_scale=1.0, typical_p=1.0, epsilon_cutoff=0.0,
                              eta_cutoff=0.0, remove_invalid_values=False, renormalize_logits=False,
                              bad_words_ids=None, sequence_bias=None, forced_bos_token_id=None,
                              forced_eos_token_id=None, begin_suppress_tokens=None, min_p=None, top_h=None,
                              exponential_decay_length_penalty=None, watermarking_config=None)  # fmt: skip


class Engine:
    """Model + processor + optional box proposer. Thread-safe: model work runs under one lock (a whole
    static batch, or one continuous step). `scheduling`: "continuous" or "static" (see the module notes);
    `prefix_cache_bytes`: the bound on earlier turns' KV caches kept for reuse (0: none; continuous only);
    `prefix_min_tokens`: shorter common prefixes are recomputed (`prefix.MIN_REUSE`, which says why);
    `max_step_tokens`: a continuous step's token budget (one per decoding row, the rest for prompt chunks);
    `pack_linear`: replace the model's CPU linear layers by oneDNN-packed ones (`linear.pack_linears`; the
    model is then for inference: `linear.unpack_linears` gives the layers back); `decode_kernel`: a bf16 model
    on the CPU decodes with the compiled attention kernel (`attention.enable_decode_kernel`; `self.decode_kernel`
    says whether it is on now); `warm`: compile it here, in the building thread (False: at the first
    `warm_up`, which a `Batcher`'s worker calls before its first request, and the fallback until then: for a
    model thread whose thread count differs from the building thread's, as in `mgllava serve`)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        proposer: BoxProposer | None = None,
        *,
        max_image_pixels: int | None = None,
        box_settings: dict[str, Any] | None = None,
        feature_cache_bytes: int = 1 << 30,
        encode_batch_size: int = 16,
        scheduling: str = "continuous",
        prefix_cache_bytes: int = 1 << 30,
        prefix_min_tokens: int = MIN_REUSE,
        max_prompt_chars: int | None = None,
        max_message_chars: int | None = None,
        max_step_tokens: int = MAX_STEP_TOKENS,
        pack_linear: bool = True,
        decode_kernel: bool = True,
        warm: bool = True,
    ) -> None:
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {SCHEDULING}, got {scheduling!r}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        self.model = model.eval()
        self.processor = processor
        self.proposer = proposer
        if max_image_pixels is not None:
            processor.image_processor.max_image_pixels = max_image_pixels
        if box_settings:
            self._set_box_settings(box_settings)
        # the high-res tensor exactly when the model has the branch (a folder saved before the setting existed
        # made it for every model)
        processor.image_processor.use_high_res = model.config.uses_high_res
        configure_generation(model, processor)
        self.features: LRUCache[torch.Tensor] = LRUCache(feature_cache_bytes)
        self.encode_batch_size = encode_batch_size
        self.scheduling = scheduling
        self.max_step_tokens = max_step_tokens
        if scheduling == "continuous":
            _check_continuous(model.generation_config)
        # both schedulers: mixed steps (continuous) and bf16 decode attention on the CPU (inference/attention.py)
        install_packed(model.language_model)
        # bf16 models on the CPU only (`enable_decode_kernel` says why not, and logs only a failed compile)
        if decode_kernel:
            enable_decode_kernel(model.language_model, compile=warm)
        # the CPU's fp32/bf16 linear layers with oneDNN-packed weights (inference/linear.py: 2-3x MKL's fp32 rate)
        self.packed_linears = pack_linears(model) if pack_linear else 0
        use_prefixes = scheduling == "continuous" and prefix_cache_bytes > 0
        self.prefixes = PrefixCache(prefix_cache_bytes, prefix_min_tokens) if use_prefixes else None
        self.max_prompt_chars = max_prompt_chars or CHARS_PER_TOKEN * self.context_length
        self.max_message_chars = max_message_chars or self.max_prompt_chars
        self._model_lock = threading.Lock()
        # fast tokenizers are not safe to share across threads: preparation and decoding each have their own
        self._text_lock = threading.Lock()
        self._decode_tokenizer = copy.deepcopy(processor.tokenizer)
        self._decode_lock = threading.Lock()

    def warm_up(self) -> None:
        """Compile the decode kernel for the calling thread (`attention.warm_decode_kernel`): a thread that
        will run the model with other thread settings than the one that built the engine calls this first
        (the batcher's worker does, once it has set its threads)."""
        with self._model_lock, torch.no_grad():
            warm_decode_kernel(self.model.language_model)  # nothing to do where no layer takes the kernel

    @property
    def decode_kernel(self) -> bool:
        """Whether bf16 decode steps take the compiled attention kernel now (False before a pending kernel's
        `warm_up`, and after a failure turned it off for the process)."""
        return decode_kernel_on(self.model.language_model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        proposer: BoxProposer | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        **options: Any,
    ) -> Engine:
        """An engine over a saved MG-LLaVA folder (`mgllava assemble` / `write_folder` output). `dtype`: a
        torch dtype or a name of `utils.dtypes.DTYPES`; None or "auto": as saved. `device_map` (and
        `max_memory`) go to `from_pretrained` as given (e.g. "auto" to spread the model over several GPUs,
        no tower block split); the model then stays where they place it and `device` is not used."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..model.modeling import MGLlavaForConditionalGeneration

        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder {str(path)!r}: no such folder")
        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
        placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=resolve_dtype(dtype), **placement)
        if not isinstance(model, MGLlavaForConditionalGeneration):
            raise ValueError(f"{path} holds a {type(model).__name__}, not an MG-LLaVA model")
        model = model if device_map is not None else model.to(device)
        return cls(model, AutoProcessor.from_pretrained(path), proposer, **options)

    def _set_box_settings(self, settings: dict[str, Any]) -> None:
        """Set the image processor's box fields (`BOX_SETTINGS`); ValueError on an unknown or bad one."""
        unknown = sorted(set(settings) - set(BOX_SETTINGS))
        if unknown:
            raise ValueError(f"unknown box settings {unknown}; known: {', '.join(BOX_SETTINGS)}")
        image_processor = self.processor.image_processor
        for name, value in settings.items():
            setattr(image_processor, name, value)
        _ = image_processor.box_options  # validates the combination now, not at the first image

    # -- properties -------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """The model's `context_length`, else its LLM's `max_position_embeddings` (`max_sequence_length`)."""
        return self.model.config.max_sequence_length

    @property
    def uses_object_tokens(self) -> bool:
        return bool(self.processor.image_processor.use_object_tokens)

    @property
    def max_image_pixels(self) -> int | None:
        return self.processor.image_processor.max_image_pixels

    # -- preparing one request ----------------------------------------------------------------------------
    def prepare(
        self,
        messages: list[dict[str, Any]],
        images: Sequence[Any] | None = None,
        boxes: Sequence[Any] | None = None,
        video: Any = None,
        video_boxes: Sequence[Any] | None = None,
        settings: GenerationSettings | None = None,
    ) -> Prepared:
        """Validate and encode one conversation. `images` default to the image parts of `messages`;
        `boxes[i]` are image i's boxes in its pixels (None: ask the proposer); `video` is a file path, PIL
        frames or a (T, H, W, 3) array, attached to the conversation's `<video>` tag."""
        settings = settings or GenerationSettings()
        self._check_text(messages)
        self._check_logit_bias(settings)
        sources, pil = self._load_images(messages, images)
        raw_boxes, origins = self._image_boxes(sources, pil, boxes)
        frames, frame_boxes, frame_origins = self._load_video(video, video_boxes)
        batch = self._encode(messages, pil, raw_boxes, frames, frame_boxes)
        ids = batch["input_ids"][0].tolist()
        self.check_length(ids, settings.max_new_tokens, bool(frames))
        image_report = [
            self._report(img, b, origin, video=False)
            for img, b, origin in zip(pil, raw_boxes, origins, strict=True)
        ]
        video_report = [
            self._report(f, b, origin, video=True)
            for f, b, origin in zip(frames, frame_boxes, frame_origins, strict=True)
        ]
        return Prepared(ids, self._frames(batch), image_report, video_report, settings)

    def _check_text(self, messages: Any) -> None:
        """Characters per message and per request, before any tokenisation."""
        total = 0
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            content = message.get("content") if isinstance(message, dict) else None
            parts = content if isinstance(content, list) else [content]
            chars = sum(len(p) if isinstance(p, str) else len(p.get("text") or "") if isinstance(p, dict) else 0
                        for p in parts)  # fmt: skip
            if chars > self.max_message_chars:
                raise EngineInputError(f"messages[{i}] holds {chars} characters of text; the limit is "
                                       f"{self.max_message_chars} per message (--max-message-chars)",
                                       f"messages[{i}].content", "prompt_too_long")  # fmt: skip
            total += chars
        if total > self.max_prompt_chars:
            raise EngineInputError(f"the conversation holds {total} characters of text; the limit is "
                                   f"{self.max_prompt_chars} per request (--max-prompt-chars)", "messages",
                                   "prompt_too_long")  # fmt: skip

    def _check_logit_bias(self, settings: GenerationSettings) -> None:
        vocab = self.model.get_output_embeddings().out_features
        for token, _ in settings.logit_bias:
            if token >= vocab:
                raise EngineInputError(f"logit_bias: token id {token} is outside the vocabulary of {vocab} tokens",
                                       "logit_bias")  # fmt: skip

    def _report(self, image: Image.Image, raw: Boxes | None, origin: str, video: bool) -> VisualBoxes:
        """The boxes that became object tokens, in the image's pixels, as the image processor selects them."""
        used = self.processor.image_processor.used_boxes(raw, *image.size, video=video)
        return VisualBoxes(image.size[0], image.size[1], used, origin)

    def _load_images(
        self, messages: list[dict[str, Any]], images: Sequence[Any] | None
    ) -> tuple[list[Any], list[Image.Image]]:
        """The images' sources (paths, bytes, arrays or PIL images, kept for box look-ups by content) and
        their decoded RGB images."""
        if images is not None:
            sources = [(f"images[{k}]", image) for k, image in enumerate(images)]
        else:
            sources = []
            for i, message in enumerate(messages if isinstance(messages, list) else []):
                try:
                    found = images_in_messages([message]) if isinstance(message, dict) else []
                except ValueError as err:
                    where = f"messages[{i}].content"
                    raise EngineInputError(f"messages[{i}]: {err}", where, "invalid_image") from err
                sources += [(f"messages[{i}]", image) for image in found]
        return [image for _, image in sources], [self._load_image(image, where) for where, image in sources]

    def _load_image(self, source: Any, where: str) -> Image.Image:
        try:
            return load_image(source, self.max_image_pixels, self.processor.image_processor.apply_exif)
        except ImageTooLarge as err:
            raise EngineInputError(f"{where}: {err}", where, "image_too_large") from err
        except ImageError as err:
            raise EngineInputError(f"{where}: {err}", where, "invalid_image") from err

    def _image_boxes(
        self, sources: list[Any], images: list[Image.Image], boxes: Sequence[Any] | None, name: str = "boxes"
    ) -> tuple[list[Boxes | None], list[str]]:
        if boxes is not None and len(boxes) != len(images):
            what = (
                "video frames but the video gives"
                if name == "video_boxes"
                else "images but the conversation has"
            )
            unit = "" if name == "video_boxes" else " images"
            raise EngineInputError(f"got boxes for {len(boxes)} {what} {len(images)}{unit}", name)
        given = list(boxes) if boxes is not None else [None] * len(images)
        out: list[Boxes | None] = [None] * len(images)
        origins = ["none"] * len(images)
        if not self.uses_object_tokens:
            return out, origins
        for k, (image, value) in enumerate(zip(images, given, strict=True)):
            if value is not None:
                out[k], origins[k] = self._given(value, image, f"{name}[{k}]"), "request"
        todo = [k for k, value in enumerate(given) if value is None]
        if self.proposer is not None and todo:
            proposals = self.proposer.propose(
                [ImageKey.of(sources[k]) for k in todo], [images[k] for k in todo]
            )
            for k, proposal in zip(todo, proposals, strict=True):
                out[k], origins[k] = proposal.boxes, ORIGINS[proposal.source]
        return out, origins

    @staticmethod
    def _given(value: Any, image: Image.Image, where: str) -> Boxes:
        try:
            return Boxes.from_any(value, image.size)
        except ValueError as err:
            raise EngineInputError(f"{where}: {err}", where, "invalid_boxes") from err

    def _load_video(
        self, video: Any, video_boxes: Sequence[Any] | None
    ) -> tuple[list[Image.Image], list[Boxes | None], list[str]]:
        if video is None:
            if video_boxes is not None:
                raise EngineInputError("video_boxes given without a video", "video_boxes")
            return [], [], []
        try:
            frames = self.processor.image_processor.frames(video)
        except VideoError as err:
            raise EngineInputError(str(err), "video", "invalid_video") from err
        lookup = self.proposer.lookup if self.proposer is not None else None
        if video_boxes is None and lookup is not None and isinstance(video, (str, Path)):
            video_boxes = lookup.video(path=str(video))  # a box file keys videos by id, path or file name
        # frames have no encoded bytes: the proposer keys their detections by pixels
        return frames, *self._image_boxes([None] * len(frames), frames, video_boxes, "video_boxes")

    def _encode(
        self,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        boxes: list[Boxes | None],
        frames: list[Image.Image],
        frame_boxes: list[Boxes | None],
    ) -> dict[str, torch.Tensor]:
        video_boxes = [frame_boxes] if frames and any(b is not None for b in frame_boxes) else None
        try:
            with self._text_lock:
                return self.processor.apply_chat_template(
                    messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    images=images,
                    boxes=boxes,
                    videos=[frames] if frames else None,
                    video_boxes=video_boxes,
                )
        except ValueError as err:
            raise EngineInputError(str(err), "messages") from err

    def check_length(self, ids: list[int], new_tokens: int, has_video: bool = False) -> None:
        """The one context rule: prompt `ids` and `new_tokens` more must fit the model's context, else an
        `EngineInputError` (`context_length_exceeded`) that counts them (generation and likelihood scoring)."""
        total = len(ids) + new_tokens
        if total > self.context_length:
            visual = sum(1 for t in ids if t == self.model.config.image_token_id)
            hint = ""
            if has_video and self.model.config.context_length is None:
                hint = (
                    " (its LLM's max_position_embeddings); video needs a longer context_length, which video "
                    "models set (preset mgllava-vicuna-7b-video, or `mgllava assemble --context-length`)"
                )
            raise EngineInputError(
                f"the prompt has {len(ids)} tokens ({visual} visual rows) and {new_tokens} more are asked for "
                f"(max_new_tokens, or a continuation to score): {total} exceeds the model's context of "
                f"{self.context_length} tokens" + hint,
                "max_tokens",
                "context_length_exceeded",
            )

    def _frames(self, batch: dict[str, torch.Tensor]) -> list[Frame]:
        """Split the processor's batch (one conversation) into per-image / per-frame tensors with keys and
        visual row counts (`num_image_tokens`, plus the image's boxes when objects get rows of their own)."""
        if "pixel_values" not in batch:
            return []
        counts = batch["object_counts"].tolist() if "object_counts" in batch else None
        frames, start = [], 0
        for j in range(batch["pixel_values"].shape[0]):
            tensors = {
                k: batch[k][j : j + 1] for k in ("pixel_values", "high_res_pixel_values") if k in batch
            }
            if counts is not None:
                tensors["object_boxes"] = batch["object_boxes"][start : start + counts[j]]
                tensors["object_counts"] = batch["object_counts"][j : j + 1]
                start += counts[j]
            rows = self.processor.visual_rows(1, counts[j] if counts is not None else 0)
            key = digest(*(tensors[k] for k in FRAME_KEYS if k in tensors))
            frames.append(Frame(key, tensors, rows))
        return frames

    # -- running a batch ----------------------------------------------------------------------------------
    def generate(
        self,
        batch: Sequence[Prepared],
        on_text: Sequence[TextCallback | None] | None = None,
        cancelled: Sequence[Callable[[], bool] | None] | None = None,
    ) -> list[ChatResult]:
        """Answer many prepared requests together. `on_text[i]` receives request i's text as it is decoded;
        `cancelled[i]()` returning True stops row i early. Static scheduling needs equal sampling settings."""
        if not batch:
            return []
        callbacks = list(on_text) if on_text is not None else [None] * len(batch)
        stops = list(cancelled) if cancelled is not None else [None] * len(batch)
        if self.scheduling == "static":
            return self._generate_static(batch, callbacks, stops)
        running = self.running_batch()
        requests = [
            Request(p, c, s, k) for k, (p, c, s) in enumerate(zip(batch, callbacks, stops, strict=True))
        ]
        results: list[ChatResult | None] = [None] * len(batch)
        finished = running.admit(requests)
        while True:
            for k, result in finished:
                if isinstance(result, Exception):
                    running.abort()
                    raise result
                results[k] = result
            if not running:
                return results
            finished = running.step()

    def running_batch(self) -> RunningBatch:
        """An empty continuous batch over this engine (`decoding.RunningBatch`), for a scheduler to drive."""
        if self.scheduling != "continuous":
            raise ValueError("running_batch needs scheduling='continuous'")
        return RunningBatch(self)

    def _generate_static(
        self,
        batch: Sequence[Prepared],
        callbacks: list[TextCallback | None],
        stops: list[Callable[[], bool] | None],
    ) -> list[ChatResult]:
        results = self.generate_static(batch, callbacks, stops)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    def generate_static(
        self,
        batch: Sequence[Prepared],
        callbacks: list[TextCallback | None],
        stops: list[Callable[[], bool] | None],
    ) -> list[ChatResult | Exception]:
        """One left-padded `model.generate` over the whole batch; if it fails, each request alone, so that a
        request that fails (non-finite logits, a failing forward) fails alone with a `RequestFailed`. A
        retried request's stream resumes after the text it had already delivered."""
        keys = {p.settings.batch_key() for p in batch}
        if len(batch) > 1 and (len(keys) > 1 or None in keys):
            raise ValueError(f"requests with different sampling settings cannot share a batch: {keys}")
        streams = [
            TextStream(Detokenizer(self.decode, self.processor.stop_token_ids, p.settings.max_new_tokens), c)
            for p, c in zip(batch, callbacks, strict=True)
        ]
        try:
            return self._static_generate(batch, streams, stops)
        except Exception as err:
            if len(batch) == 1:
                return [failed(err)]
            logger.warning(
                "a static batch of %d failed (%s); retrying its requests one by one", len(batch), err
            )
        out: list[ChatResult | Exception] = []
        for prepared, stream, stop in zip(batch, streams, stops, strict=True):
            stream.restart()
            try:
                out += self._static_generate([prepared], [stream], [stop])
            except Exception as err:
                out.append(failed(err))
        return out

    def _static_generate(
        self, batch: Sequence[Prepared], streams: list[TextStream], stops: list[Callable[[], bool] | None]
    ) -> list[ChatResult]:
        limits = [p.settings.max_new_tokens for p in batch]
        with self._model_lock, torch.no_grad():
            rows = self.visual_rows([f for p in batch for f in p.frames])
            input_ids, mask = self.left_pad([p.input_ids for p in batch])
            extra = (
                {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=rows)}}
                if rows
                else {}
            )
            if batch[0].settings.seed is not None:
                torch.manual_seed(batch[0].settings.seed)
            width = input_ids.shape[1]
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(limits),
                streamer=BatchStreamer(streams),
                stopping_criteria=StoppingCriteriaList([RowLimits(width, limits, stops)]),
                logits_processor=LogitsProcessorList([RowRules(width, [p.settings for p in batch])]),
                **batch[0].settings.generate_kwargs(),
                **extra,
            )
        new = out[:, width:].cpu()
        results = []
        for i, p in enumerate(batch):
            generated = new[i, : limits[i]].tolist()
            stopped = self.processor.answer_ids(generated)[1]
            reason = "stop" if stopped else ("cancelled" if stops[i] is not None and stops[i]() else "length")
            results.append(self.answer(p, generated, streams[i], reason))
        return results

    def decode(self, ids: list[int]) -> str:
        with self._decode_lock:
            return self._decode_tokenizer.decode(ids, skip_special_tokens=True)

    def visual_rows(self, frames: list[Frame]) -> list[torch.Tensor]:
        """Each frame's (rows, H) features, from the cache or encoded in batches of the missing ones."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Frame] = {}
        for frame in frames:
            if frame.key not in found and frame.key not in missing:
                cached = self.features.get(frame.key)
                if cached is None:
                    missing[frame.key] = frame
                else:
                    found[frame.key] = cached
        todo = list(missing.values())
        for start in range(0, len(todo), self.encode_batch_size):
            chunk = todo[start : start + self.encode_batch_size]
            stacked = {k: torch.cat([f.tensors[k] for f in chunk]) for k in chunk[0].tensors}
            output = self.model.get_image_features(**stacked)
            for frame, rows in zip(chunk, output.pooler_output, strict=True):
                self.features.put(frame.key, rows)
                found[frame.key] = rows
        return [found[f.key] for f in frames]

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids (B, L) left-padded with the pad token, and their mask (B, L), on the model's device."""
        ids, mask = pad_batch(sequences, self.processor.pad_token_id, "left")
        device = self.model.device
        return ids.to(device), mask.to(device)

    def answer(self, prepared: Prepared, generated: list[int], stream: TextStream, reason: str) -> ChatResult:
        """The result of one row: `generated` up to the first stop token (included in the count), its text
        (as `MGLlavaProcessor.decode_answer`) flushed to the row's stream."""
        answer, stopped = self.processor.answer_ids(generated)
        text = self.decode(answer).strip()
        stream.finish(text)
        return ChatResult(
            text=text,
            token_ids=answer,
            finish_reason=reason,
            prompt_tokens=len(prepared.input_ids),
            completion_tokens=len(answer) + stopped,
            images=prepared.images,
            video=prepared.video,
        )

    # -- one request --------------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict[str, Any]],
        images: Sequence[Any] | None = None,
        boxes: Sequence[Any] | None = None,
        video: Any = None,
        video_boxes: Sequence[Any] | None = None,
        settings: GenerationSettings | None = None,
    ) -> ChatResult:
        """One answer (see `prepare` for the arguments)."""
        return self.generate([self.prepare(messages, images, boxes, video, video_boxes, settings)])[0]

    def stream(
        self,
        messages: list[dict[str, Any]],
        images: Sequence[Any] | None = None,
        boxes: Sequence[Any] | None = None,
        video: Any = None,
        video_boxes: Sequence[Any] | None = None,
        settings: GenerationSettings | None = None,
    ) -> ChatStream:
        """Like `chat`, but iterate the returned stream for text pieces; `.result` is set at its end."""
        return ChatStream(self, self.prepare(messages, images, boxes, video, video_boxes, settings))


class ChatStream:
    """Text pieces of one answer as they are generated (generation runs in a background thread).
    Leaving the loop early cancels generation. After the loop, `result` is the full `ChatResult`."""

    _END = object()

    def __init__(self, engine: Engine, prepared: Prepared) -> None:
        self.prepared = prepared
        self.result: ChatResult | None = None
        self._pieces: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(engine,), daemon=True)
        self._thread.start()

    def _run(self, engine: Engine) -> None:
        try:
            self.result = engine.generate([self.prepared], [self._pieces.put], [self._cancel.is_set])[0]
        except Exception as err:  # handed to the consumer's thread by __iter__
            self._error = err
        finally:
            self._pieces.put(self._END)

    def __iter__(self) -> Iterator[str]:
        try:
            while (piece := self._pieces.get()) is not self._END:
                yield piece
        finally:
            self._cancel.set()
            self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancel.set()


def _check_continuous(config: GenerationConfig) -> None:
    unsupported = {
        name: value
        for name, neutral in UNSUPPORTED_GENERATION.items()
        if (value := getattr(config, name, None)) is not None and value != neutral
    }
    if unsupported:
        raise ValueError(
            f"the model's generation config sets {unsupported}, which continuous scheduling does not apply; "
            "use Engine(..., scheduling='static') or reset them"
        )

"""`mgllava chat`: a terminal conversation over the engine (a thin adapter, as nanochat's chat_cli).

`ChatSession` holds the conversation (messages, the images and video attached to it, the boxes of the
last answer); `repl` reads lines and commands from a text stream and writes the streamed answers:

    /image FILE   attach an image to your next message      /boxes   the tags and boxes of the last answer
    /reset        start over (the command-line images again)  /quit    leave (end of input too)

Images are decoded once and the engine caches their visual rows, so later turns only run the LLM.
Boxes of the command-line images come from `--boxes`; every image without them goes to the engine's
proposer: a `--box-file` (the one look-up rule of `boxes.lookup`) and/or a `--detector`. An image neither
finds is reported as "boxes from missing" (`/boxes` and `--show-boxes`), never silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from .inference import ChatResult, Engine, EngineInputError, GenerationSettings, VisualBoxes
from .media.images import ImageError, load_image

HELP = (
    "type a question and press enter; commands: /image FILE (attach to your next message), "
    "/boxes (tags and boxes of the last answer), /reset (start over), /quit"
)


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        images: list[str | Path] = (),
        video: str | Path | None = None,
        settings: GenerationSettings | None = None,
        boxes: list[Any] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings or GenerationSettings()
        self.start_images = [self._check(path) for path in images]
        if boxes is not None and len(boxes) != len(self.start_images):
            raise ValueError(f"got boxes for {len(boxes)} images but {len(self.start_images)} images")
        self.start_boxes = list(boxes) if boxes is not None else [None] * len(self.start_images)
        self.start_video = self._load_video(video) if video is not None else None
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.images: list[str] = []  # attached to earlier messages (files: boxes are looked up by content)
        self.pending: list[str] = list(self.start_images)  # go with the next message
        self.image_boxes: list[Any] = []  # their boxes (None: the proposer's, or none)
        self.pending_boxes: list[Any] = list(self.start_boxes)
        self.video_pending = self.start_video is not None
        self.video: list[Image.Image] | None = None
        self.last: ChatResult | None = None

    def _check(self, path: str | Path) -> str:
        """The file, once decoded here so that an unusable image is refused when it is attached."""
        load_image(path, self.engine.max_image_pixels)
        return str(path)

    def _load_video(self, path: str | Path) -> list[Image.Image]:
        return self.engine.processor.image_processor.frames(path)

    def attach(self, path: str | Path) -> None:
        """Attach an image to the next message (raises `ImageError` naming the file)."""
        self.pending.append(self._check(path))
        self.pending_boxes.append(None)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatResult:
        """Answer `text` in the conversation, streaming pieces to `on_text`; the turn is kept on success."""
        parts = [{"type": "image"} for _ in self.pending]
        parts += [{"type": "video"}] if self.video_pending else []
        message = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
        video = self.start_video if (self.video_pending or self.video is not None) else None
        stream = self.engine.stream(
            [*self.messages, message],
            images=self.images + self.pending,
            boxes=self.image_boxes + self.pending_boxes,
            video=video,
            settings=self.settings,
        )
        for piece in stream:
            if on_text is not None:
                on_text(piece)
        self.messages += [message, {"role": "assistant", "content": stream.result.text}]
        self.images += self.pending
        self.image_boxes += self.pending_boxes
        self.pending, self.pending_boxes = [], []
        if self.video_pending:
            self.video, self.video_pending = self.start_video, False
        self.last = stream.result
        return stream.result

    def boxes(self) -> list[tuple[str, VisualBoxes]]:
        """(name, boxes) of every image and video frame of the last answer."""
        if self.last is None:
            return []
        named = [(f"image {k + 1}", b) for k, b in enumerate(self.last.images)]
        return named + [(f"video frame {t + 1}", b) for t, b in enumerate(self.last.video)]


def describe_boxes(named: list[tuple[str, VisualBoxes]]) -> str:
    """Human-readable tags and boxes, one block per image."""
    if not named:
        return "(no images in this conversation)"
    lines = []
    for name, used in named:
        tags = ", ".join(used.tags) or "none"
        lines.append(f"{name} ({used.width}x{used.height}, boxes from {used.source}): tags {tags}")
        for box, score, label in zip(
            used.boxes.xyxy.tolist(), used.boxes.scores.tolist(), used.boxes.labels, strict=True
        ):
            lines.append(f"  {label:<16} {score:.2f}  [{', '.join(f'{v:.1f}' for v in box)}]")
    return "\n".join(lines)


def answer_once(session: ChatSession, prompt: str, out: TextIO, show_boxes: bool) -> int:
    """`--prompt`: print one streamed answer (after its boxes with `--show-boxes`)."""
    if show_boxes:
        result = session.ask(prompt)
        out.write(describe_boxes(session.boxes()) + "\n" + result.text + "\n")
    else:
        session.ask(prompt, lambda piece: (out.write(piece), out.flush()))
        out.write("\n")
    return 0


def repl(session: ChatSession, lines: TextIO, out: TextIO, show_boxes: bool = False) -> int:
    """The interactive loop; returns when the input ends or on /quit."""
    out.write(HELP + "\n")
    while True:
        out.write("you> ")
        out.flush()
        line = lines.readline()
        if not line:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text, out):
                return 0
            continue
        _turn(session, text, out, show_boxes)


def _turn(session: ChatSession, text: str, out: TextIO, show_boxes: bool) -> None:
    out.write("assistant> ")
    out.flush()
    try:
        result = session.ask(text, lambda piece: (out.write(piece), out.flush()))
    except EngineInputError as err:
        out.write(f"\nerror: {err}\n")
        return
    except KeyboardInterrupt:
        out.write("\n(interrupted; this turn is dropped)\n")
        return
    out.write("\n")
    if result.finish_reason == "length":
        out.write(f"(stopped at {session.settings.max_new_tokens} tokens)\n")
    if show_boxes:
        out.write(describe_boxes(session.boxes()) + "\n")


def _command(session: ChatSession, text: str, out: TextIO) -> bool:
    """Run a /command; True means quit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        session.reset()
        out.write("(conversation cleared)\n")
    elif name == "/image":
        if not arg:
            out.write("usage: /image FILE\n")
            return False
        try:
            session.attach(arg)
            out.write(f"(image {arg} attached to your next message)\n")
        except ImageError as err:
            out.write(f"error: {err}\n")
    elif name == "/boxes":
        out.write(describe_boxes(session.boxes()) + "\n" if session.last else "(no answer yet)\n")
    elif name == "/help":
        out.write(HELP + "\n")
    else:
        out.write(f"unknown command {name}; {HELP}\n")
    return False


def parse_boxes(boxes_json: str | None) -> list[Any] | None:
    """`--boxes`: JSON, one list of [x1, y1, x2, y2] per command-line image (None: not given)."""
    if boxes_json is None:
        return None
    try:
        boxes = json.loads(boxes_json)
    except json.JSONDecodeError as err:
        raise ValueError(f"--boxes is not valid JSON: {err.msg}") from err
    if not isinstance(boxes, list):
        raise ValueError("--boxes must be a JSON list with one list of [x1, y1, x2, y2] per image")
    return boxes

"""Decode any image a user may hand us into an upright 8-bit RGB `PIL.Image`, or fail with a clear error.

Accepts a path, raw bytes, a `PIL.Image` or an HxW(xC) uint8 array. Handles every PIL mode we have seen
in training sets (L, LA, P, RGBA, CMYK, I, I;16, F, 1), EXIF orientation, truncated and corrupt files,
zero-size images and decompression bombs (a configurable pixel limit checked from the header, before the
pixels are decoded).

Deviations from the reference, which calls `Image.open(path).convert("RGB")`: EXIF orientation is applied
(set `apply_exif=False` to match the reference on rotated photos), and 16-bit images are scaled to 8 bits
instead of being clipped at 255. Alpha is dropped as in the reference.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An image that cannot be used, with the input named and the reason stated."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (servers answer these with 413 rather than 400)."""


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def plain(err: BaseException) -> str:
    """An image library's error message without Python object reprs ("cannot identify image file
    <_io.BytesIO object at 0x7f...>" becomes "cannot identify image file the data")."""
    return _OBJECT_REPR.sub("the data", str(err)) or type(err).__name__


def describe(source: ImageInput) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image {os.fspath(source)!r}"
    if isinstance(source, bytes):
        return f"image bytes ({len(source)} B)"
    if isinstance(source, Image.Image):
        return f"PIL image {source.mode} {source.size[0]}x{source.size[1]}"
    if isinstance(source, np.ndarray):
        return f"image array {source.shape} {source.dtype}"
    return f"image of type {type(source).__name__}"


def _open(source: ImageInput, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageError(f"{name}: arrays must be HxW or HxWxC uint8")
        return Image.fromarray(source)
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise ImageError(f"{name}: no such file")
        data: io.IOBase | str | os.PathLike = source
    elif isinstance(source, bytes):
        data = io.BytesIO(source)
    else:
        raise ImageError(f"{name}: expected a path, bytes, PIL image or uint8 array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(data)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{name}: too many pixels ({err})") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"{name}: not a readable image ({plain(err)})") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # float32, in place: 4 bytes a pixel (float64 with temporaries took ~16). Exact for 16-bit input:
        # k / 257 is never within float32's error of a .5 boundary.
        arr = np.array(image, dtype=np.float32)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr /= 257.0  # 16-bit range onto 8 bits
        np.rint(arr, out=arr)
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # "palette images with transparency ..." : alpha is dropped
        return image.convert("RGB")


def load_image(
    source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, apply_exif: bool = True
) -> Image.Image:
    """Decoded, upright, RGB. Raises `ImageError` naming the input for anything unusable."""
    name = describe(source)
    image = _open(source, name)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(max_image_pixels); raise the limit if this image is legitimate"
        )
    try:
        image.load()
        if apply_exif:
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{name}: cannot decode ({plain(err)})") from err

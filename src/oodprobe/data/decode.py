"""Safe image decoding: every readable image becomes 8-bit RGB, every bad one a short DataError."""

from __future__ import annotations

import errno
import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from oodprobe.data.base import printable_path
from oodprobe.errors import DataError

#: PIL's own decompression-bomb threshold (about 89.5 megapixels), used when none is given.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

#: Background that transparent pixels are composited onto: mid grey, so that transparency
#: turns into neither "white paper" nor "black void" for the encoder.
ALPHA_BACKGROUND: tuple[int, int, int] = (128, 128, 128)

# Short, stable reasons: they are stored in skip records and compared in tests.
REASON_MISSING = "file not found"
REASON_EMPTY = "empty file"
REASON_NOT_IMAGE = "not an image file"
REASON_TRUNCATED = "image file is truncated"
REASON_CORRUPT = "corrupt image data"
REASON_BOMB = "decompression bomb"
REASON_UNREADABLE = "cannot read file"
REASON_DANGLING = "dangling symbolic link"
REASON_LOOP = "symbolic link loop"

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class DecodeError(DataError):
    """An image that cannot be decoded; ``reason`` is a short phrase fit for a skip record."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason
        super().__init__(f"cannot decode {source}: {reason}")


def decode_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode a file path or encoded bytes into an 8-bit RGB image, or raise DecodeError.

    - EXIF orientation is applied, so a portrait photo stored sideways comes out upright.
    - Grayscale (``1``, ``L``, ``I``, ``F``), palette (``P``, with or without transparency),
      CMYK, YCbCr and 16-bit (``I;16``, ``I;16B``; ``I`` is read as 16-bit too, which is what PIL
      opens 16-bit PGM files as) all become RGB. 16-bit values are scaled (``round(v / 257)``)
      instead of clipped at 255 as ``convert("RGB")`` would. ``F`` images within [0, 1] are scaled
      by 255, other ``F`` images are clipped to [0, 255].
    - Images with an alpha channel or palette transparency are composited onto a neutral mid-grey
      background (:data:`ALPHA_BACKGROUND`) before the alpha is dropped.
    - Multi-frame files (GIF, TIFF) give their first frame.

    Zero-byte, truncated, non-image and over-large files (more than ``max_pixels`` pixels,
    default PIL's 89,478,485; checked from the header before any pixel is decoded) raise
    :class:`DecodeError` (a ``DataError``) with a message ``cannot decode SOURCE: REASON``.
    PIL's ``DecompressionBombWarning`` counts as an error as well. A dangling symbolic link and a
    symbolic-link loop (``a -> b -> a``) are errors with their own reasons. ``name`` replaces
    the source in messages (useful for bytes); by default a path is shown as
    :func:`~oodprobe.data.base.printable_path` text, so messages print whatever the file name.
    """
    label = (
        name
        if name is not None
        else ("<bytes>" if isinstance(source, bytes) else printable_path(source))
    )
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytes):
        if not source:
            raise DecodeError(label, REASON_EMPTY)
        return _decode_stream(io.BytesIO(source), label, limit)
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DecodeError(label, REASON_DANGLING if path.is_symlink() else REASON_MISSING) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DecodeError(label, REASON_LOOP) from None
        raise DecodeError(label, f"{REASON_UNREADABLE}: {error.strerror or error}") from None
    except ValueError:  # an embedded NUL byte: no OS allows it in a file name
        raise DecodeError(label, f"{REASON_UNREADABLE}: the path contains a NUL byte") from None
    if path.is_dir():
        raise DecodeError(label, f"{REASON_NOT_IMAGE} (a folder)")
    if size == 0:
        raise DecodeError(label, REASON_EMPTY)
    try:
        with open(path, "rb") as handle:
            return _decode_stream(handle, label, limit)
    except PermissionError:
        raise DecodeError(label, f"{REASON_UNREADABLE}: permission denied") from None


def _decode_stream(stream: IO[bytes], label: str, limit: int) -> Image.Image:
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            raise DecodeError(label, REASON_NOT_IMAGE) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DecodeError(label, f"{REASON_BOMB}: {error}") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
            raise DecodeError(label, _reason(error)) from None
        with image:
            width, height = image.size
            if width * height > limit:
                raise DecodeError(
                    label,
                    f"{REASON_BOMB}: {width}x{height} = {width * height} pixels "
                    f"is more than max_pixels={limit}",
                )
            try:
                image.load()  # force a full decode now: truncation must fail here, not later
                upright = _exif_transpose(image)
                return _to_rgb(upright, label)
            except DecodeError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
                raise DecodeError(label, f"{REASON_BOMB}: {error}") from None
            except (
                OSError,
                SyntaxError,
                ValueError,
                EOFError,
                struct.error,
                zlib.error,
                IndexError,
            ) as error:
                raise DecodeError(label, _reason(error)) from None


def _reason(error: BaseException) -> str:
    """Map PIL's many messages for broken files onto a few stable phrases."""
    text = str(error).lower()
    if "truncated" in text or "not enough image data" in text or isinstance(error, EOFError):
        return REASON_TRUNCATED
    return REASON_CORRUPT


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        # Damaged EXIF must not cost a decodable image: keep the stored orientation.
        return image


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see decode_image for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert(
            "RGB"
        )
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise DecodeError(label, f"unsupported image mode {mode}") from None

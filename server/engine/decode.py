"""Encoded frame bytes (JPEG / PNG) -> RGB uint8 array, with size limits checked before the pixels are decoded."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MAX_DIMENSION = 2**31 - 1  # the PNG specification's bound on width and height


class FrameRejected(ValueError):
    """A frame the server will not process; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FrameLimits:
    max_bytes: int = 8 * 1024 * 1024
    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 4096 * 2160
    max_aspect_ratio: float = 8.0  # long side / short side: a short-side resize makes the long side this many times it


def check_size(data: bytes, limits: FrameLimits) -> None:
    """Cheap checks on the raw message, before it is queued for decoding."""
    if len(data) == 0:
        raise FrameRejected("empty_frame", "binary message is empty")
    if len(data) > limits.max_bytes:
        raise FrameRejected("frame_too_large", f"frame is {len(data)} bytes; the limit is {limits.max_bytes}")


def decode_image(data: bytes, limits: FrameLimits) -> np.ndarray:
    """JPEG or PNG bytes -> RGB uint8 [H, W, 3]. Raises FrameRejected with a protocol error code."""
    check_size(data, limits)
    if data.startswith(PNG_SIGNATURE):  # IHDR first: check the size before Pillow does
        _check_dimensions(*png_size(data), limits)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        _check_dimensions(*image.size, limits)
        image.load()
    except FrameRejected:
        raise
    except Image.UnidentifiedImageError:
        raise FrameRejected("undecodable", f"not a decodable JPEG or PNG image ({image_format(data)} data)") from None
    except Image.DecompressionBombError as err:
        raise FrameRejected("image_too_large", f"image rejected by the decoder: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated or corrupt data
        raise FrameRejected("undecodable", f"cannot decode {image_format(data)} image: {err}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)  # [H, W, 3] uint8


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first, be 13 bytes long and pass its CRC: a size
    read from a corrupt header would call random bytes "too large" instead of undecodable."""
    if len(data) < 33:
        raise FrameRejected("undecodable", "cannot decode PNG image: truncated header")
    length, kind = struct.unpack(">I4s", data[8:16])
    (crc,) = struct.unpack(">I", data[29:33])
    if length != 13 or kind != b"IHDR" or zlib.crc32(data[12:29]) != crc:
        raise FrameRejected("undecodable", "cannot decode PNG image: corrupt IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if width > PNG_MAX_DIMENSION or height > PNG_MAX_DIMENSION:
        raise FrameRejected("undecodable", f"cannot decode PNG image: invalid size {width}x{height}")
    return width, height


def _check_dimensions(width: int, height: int, limits: FrameLimits) -> None:
    if width <= 0 or height <= 0:
        raise FrameRejected("empty_image", f"image is {width}x{height}")
    if width > limits.max_width or height > limits.max_height or width * height > limits.max_pixels:
        raise FrameRejected(
            "image_too_large",
            f"image is {width}x{height}; limits are {limits.max_width}x{limits.max_height} "
            f"and {limits.max_pixels} pixels",
        )
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise FrameRejected(
            "bad_aspect_ratio",
            f"image is {width}x{height}; the long side may be at most {limits.max_aspect_ratio:g} times the short side",
        )


def image_format(data: bytes) -> str:
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    return "unknown"

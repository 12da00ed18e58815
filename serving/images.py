"""Decode untrusted uploaded image bytes into a model-ready tensor, and encode results as PNG.

Checks run from cheapest to most expensive, so hostile input is refused before it costs memory:
byte count, then the format and pixel count from the header (Pillow reads only the header on
``Image.open``), then the full decode. Pillow's own decompression-bomb guard is kept and reported
as the same "too large" error. Only raster formats that Pillow decodes in-process are accepted
(no EPS, which would run Ghostscript).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import encode_png
from torchvision.transforms.v2.functional import pil_to_tensor

# Formats decoded by Pillow's own C code. Anything else is refused before decoding.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class BadImageError(ValueError):
    """The uploaded bytes are not a usable image. ``status_code`` is the HTTP status to answer."""

    status_code = 400


class ImageTooLargeError(BadImageError):
    """The image is over the configured byte or pixel limit (decompression bombs included)."""

    status_code = 413


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds for one uploaded image (``Settings.max_image_bytes`` / ``max_image_pixels``)."""

    max_bytes: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"image limits must be positive, got {self}")


def check_byte_size(size: int, limits: ImageLimits) -> None:
    """Raise :class:`ImageTooLargeError` when ``size`` bytes is over the byte limit."""
    if size > limits.max_bytes:
        raise ImageTooLargeError(
            f"image is {size} bytes; the limit is {limits.max_bytes} bytes (MODELCOMMONS_MAX_IMAGE_BYTES)"
        )


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} "
            "pixels (MODELCOMMONS_MAX_IMAGE_PIXELS)"
        )


def decode_image(data: bytes, limits: ImageLimits) -> torch.Tensor:
    """Untrusted encoded image bytes -> ``3xHxW`` uint8 RGB tensor (EXIF orientation applied).

    Raises :class:`ImageTooLargeError` (413) over a limit and :class:`BadImageError` (400) for empty,
    unrecognised, truncated or otherwise undecodable data. Never returns a partially decoded image:
    Pillow's ``LOAD_TRUNCATED_IMAGES`` is left at its default (off), so a short file fails to load.
    """
    if not data:
        raise BadImageError("image is empty (0 bytes)")
    check_byte_size(len(data), limits)
    with warnings.catch_warnings():
        # Pillow warns (rather than raises) between 1x and 2x its own pixel cap: make that an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                _check_pixels(im.width, im.height, limits)  # header only: nothing decoded yet
                im.load()
                upright = ImageOps.exif_transpose(im)  # pixels as the image is displayed
                rgb = upright.convert("RGB")
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise BadImageError(
                f"bytes are not a recognised image ({len(data)} bytes, starting {data[:8]!r}); "
                f"allowed formats: {', '.join(ALLOWED_FORMATS)}"
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            # Pillow reports truncated or corrupt data with any of these.
            raise BadImageError(f"image could not be decoded (truncated or corrupt): {exc}") from exc
    return pil_to_tensor(rgb)  # (3, H, W) uint8


def encode_png_bytes(image: torch.Tensor) -> bytes:
    """``3xHxW`` (or ``1xHxW``) uint8 tensor -> PNG file bytes."""
    return bytes(encode_png(image.contiguous().cpu()).numpy().tobytes())

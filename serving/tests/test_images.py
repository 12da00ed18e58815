"""decode_image refuses every kind of bad upload with a clear error, and decodes good ones exactly."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from serving.images import BadImageError, ImageLimits, ImageTooLargeError, decode_image, encode_png_bytes

LIMITS = ImageLimits(max_bytes=100_000, max_pixels=500_000)


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_png_decodes_to_rgb_uint8_chw_with_exact_pixels() -> None:
    im = Image.new("RGB", (7, 5), (10, 20, 30))
    im.putpixel((6, 4), (255, 0, 128))
    t = decode_image(_encode(im), LIMITS)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 5, 7)
    assert t[:, 0, 0].tolist() == [10, 20, 30]
    assert t[:, 4, 6].tolist() == [255, 0, 128]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_other_modes_become_three_channels(mode: str) -> None:
    t = decode_image(_encode(Image.new(mode, (9, 4))), LIMITS)
    assert tuple(t.shape) == (3, 4, 9)


def test_jpeg_decodes() -> None:
    t = decode_image(_encode(Image.new("RGB", (16, 8), (200, 100, 50)), "JPEG", quality=95), LIMITS)
    assert tuple(t.shape) == (3, 8, 16)
    assert abs(int(t[0, 4, 8]) - 200) <= 3


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = _encode(Image.new("RGB", (20, 10)), "JPEG", exif=exif.tobytes())
    assert tuple(decode_image(data, LIMITS).shape) == (3, 20, 10)


def test_empty_bytes() -> None:
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"", LIMITS)


def test_non_image_bytes_name_the_problem() -> None:
    with pytest.raises(BadImageError, match="not a recognised image") as info:
        decode_image(b"%PDF-1.4 definitely not a picture", LIMITS)
    assert info.value.status_code == 400
    assert not isinstance(info.value, ImageTooLargeError)


def test_formats_outside_the_allow_list_are_refused() -> None:
    # EPS would be rendered by Ghostscript: never let it reach a decoder.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(BadImageError, match="allowed formats"):
        decode_image(eps, LIMITS)


def test_truncated_png_fails_to_load() -> None:
    data = _encode(Image.effect_noise((64, 64), 40).convert("RGB"))
    with pytest.raises(BadImageError, match="truncated or corrupt") as info:
        decode_image(data[: len(data) // 2], LIMITS)
    assert info.value.status_code == 400


def test_over_byte_limit_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError, match="100001 bytes; the limit is 100000") as info:
        decode_image(b"\x89PNG" + b"\0" * 99_997, LIMITS)
    assert info.value.status_code == 413


def test_over_pixel_limit_from_header_small_file() -> None:
    data = _encode(Image.new("L", (1000, 1000)))  # a few KB, a million pixels
    assert len(data) < 10_000
    with pytest.raises(ImageTooLargeError, match="1000x1000 = 1000000 pixels; the limit is 500000"):
        decode_image(data, LIMITS)


def test_pillow_decompression_bomb_guard_maps_to_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's own guard fires in Image.open (before our header check) when its cap is lower than ours.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(Image.new("L", (50, 30)))  # 1500 px: Pillow warns, we refuse
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(data, ImageLimits(max_bytes=100_000, max_pixels=10_000_000))
    big = _encode(Image.new("L", (100, 30)))  # 3000 px > 2x cap: Pillow raises
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(big, ImageLimits(max_bytes=100_000, max_pixels=10_000_000))


def test_encode_png_roundtrip() -> None:
    t = torch.randint(0, 256, (3, 6, 11), dtype=torch.uint8)
    assert torch.equal(decode_image(encode_png_bytes(t), LIMITS), t)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_bytes=0, max_pixels=10)

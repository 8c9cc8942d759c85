import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vfm.models.images import ImageLimits, InvalidImage, decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())  # 300 x 451 RGB


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode_to_rgb(photo, fmt):
    arr = decode_image(_encode(photo, fmt))
    assert arr.dtype == np.uint8 and arr.shape == (300, 451, 3)
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        assert np.array_equal(arr, np.asarray(photo))


def test_gif_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    arr = decode_image(buf.getvalue())
    assert arr.shape == (10, 20, 3)
    assert arr[0, 0, 0] > 200 and arr[0, 0, 2] < 50  # red, the first frame


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    arr = decode_image(_encode(photo, "JPEG", exif=exif))
    assert arr.shape == (451, 300, 3)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(photo, mode):
    if mode == "I;16":
        src = Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257))
        data = _encode(src, "PNG")
    else:
        src = photo.convert(mode)
        data = _encode(src, "TIFF" if mode == "CMYK" else "PNG")
    arr = decode_image(data)
    assert arr.shape == (300, 451, 3) and arr.dtype == np.uint8
    if mode == "I;16":  # 16-bit grey scaled back to 8-bit, not clipped to white
        grey = np.asarray(photo.convert("L"))
        assert np.abs(arr[:, :, 0].astype(int) - grey).max() <= 1


def test_rgba_is_flattened_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    arr = decode_image(_encode(img, "PNG"))
    assert (arr == 255).all()


def test_empty_bytes():
    with pytest.raises(InvalidImage) as info:
        decode_image(b"")
    assert info.value.code == "empty" and info.value.status == 400


def test_text_is_not_an_image():
    with pytest.raises(InvalidImage) as info:
        decode_image(b"hello, this is not an image at all")
    assert info.value.code == "not_an_image" and info.value.status == 415


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(photo, fmt):
    data = _encode(photo, fmt)
    with pytest.raises(InvalidImage) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.code == "corrupt" and 400 <= info.value.status < 500


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bomb_is_refused_before_decoding():
    with pytest.raises(InvalidImage) as info:
        decode_image(_png_header_only(50_000, 50_000))
    assert info.value.code == "too_many_pixels" and info.value.status == 413


def test_limits_come_from_settings(photo):
    data = _encode(photo, "PNG")
    with pytest.raises(InvalidImage) as info:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert info.value.code == "too_large" and info.value.status == 413
    with pytest.raises(InvalidImage) as info:
        decode_image(data, ImageLimits(max_pixels=300 * 451 - 1))
    assert info.value.code == "too_many_pixels"
    assert decode_image(data, ImageLimits(max_bytes=len(data), max_pixels=300 * 451)).shape == (300, 451, 3)

"""Decode untrusted image bytes into RGB arrays, and turn RGB arrays into network inputs.

Everything that can go wrong with the bytes raises ``InvalidImage``, which carries the HTTP
status the service answers with (400 corrupt, 413 too large, 415 not an image).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .spec import Preprocess

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")

# We enforce our own pixel limit before decoding; Pillow's global one would raise its own
# DecompressionBombError/warning at a different threshold.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class InvalidImage(ValueError):
    """Bytes we cannot or will not decode. ``code`` is a stable machine-readable reason."""

    STATUS = {"empty": 400, "corrupt": 400, "too_large": 413, "too_many_pixels": 413,
              "not_an_image": 415, "unsupported_format": 415}

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.status = self.STATUS.get(code, 400)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000   # about 6300 x 6300


DEFAULT_LIMITS = ImageLimits()


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB, EXIF orientation applied, first frame of animations."""
    if not data:
        raise InvalidImage("empty", "The image is empty (0 bytes).")
    if len(data) > limits.max_bytes:
        raise InvalidImage("too_large", f"The image is {len(data)} bytes; the limit is {limits.max_bytes}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("not_an_image", "The bytes are not an image in a supported format "
                           f"({', '.join(f for f in SUPPORTED_FORMATS if f != 'MPO')}).") from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidImage("corrupt", f"The image header could not be read: {exc}.") from None
    if img.format not in SUPPORTED_FORMATS:
        raise InvalidImage("unsupported_format", f"Image format {img.format} is not supported.")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage("corrupt", f"The image declares a size of {width}x{height}.")
    if width * height > limits.max_pixels:
        raise InvalidImage("too_many_pixels", f"The image is {width}x{height} = {width * height} pixels; "
                           f"the limit is {limits.max_pixels}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    except InvalidImage:
        raise
    except Exception as exc:
        raise InvalidImage("corrupt", f"The image is truncated or corrupt: {exc}.") from None
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (grey, palette, RGBA, 16-bit, CMYK, ...) -> 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # flatten on white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def as_rgb_array(image) -> np.ndarray:
    """Accept a decoded array (HxW or HxWx{1,3,4}) or a PIL image; return HxWx3 uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"Images must be uint8 arrays, got {arr.dtype}.")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"Images must be HxWx3 RGB, got shape {arr.shape}.")
    return np.ascontiguousarray(arr)


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, spec: Preprocess) -> np.ndarray:
    """The geometric part of ``spec`` (resize/crop), on uint8 RGB, with Pillow."""
    resample = Image.BICUBIC if spec.interpolation == "bicubic" else Image.BILINEAR
    pil = Image.fromarray(as_rgb_array(image))
    h, w = _size_hw(spec.size)
    if spec.resize_mode == "none":
        return np.asarray(pil)
    if spec.resize_mode == "resize":
        return np.asarray(pil.resize((w, h), resample))
    if spec.resize_mode == "longest_side":
        scale = max(h, w) / max(pil.size)
        nw, nh = max(1, int(pil.size[0] * scale + 0.5)), max(1, int(pil.size[1] * scale + 0.5))
        return np.asarray(pil.resize((nw, nh), resample))
    # resize_center_crop: shorter side to size/crop_pct, then a centred crop of size.
    short = int(min(h, w) / spec.crop_pct)
    iw, ih = pil.size
    scale = short / min(iw, ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    left, top = (nw - w) // 2, (nh - h) // 2
    if nw * nh > 4 * max(iw * ih, w * h):
        # An extreme aspect ratio (1 x 40000) would scale to gigapixels before the crop: resize only the
        # region the crop keeps (the same geometry, bounded memory and time).
        sx, sy = nw / iw, nh / ih
        box = (left / sx, top / sy, (left + w) / sx, (top + h) / sy)
        return np.asarray(pil.resize((w, h), resample, box=box))
    pil = pil.resize((nw, nh), resample)
    return np.asarray(pil.crop((left, top, left + w, top + h)))


def normalize(batch_uint8: np.ndarray, spec: Preprocess) -> np.ndarray:
    """NHWC uint8 -> NCHW float32, scaled to [0, 1] then standardised with mean/std."""
    x = batch_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_batch(images: Sequence[np.ndarray], spec: Preprocess) -> np.ndarray:
    """Images of any sizes -> one NCHW float32 batch (every image resized the same way)."""
    return normalize(np.stack([resize_image(im, spec) for im in images]), spec)

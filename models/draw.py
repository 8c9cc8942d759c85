"""Pictures of what a model saw: its JSON answer drawn on the photo (Pillow only).

    >>> picture = draw_answer(image, runner.detect([image])[0].to_json())   # a PIL image
    >>> picture.save("seen.png")

``draw_answer`` takes the answers as the CLI and the HTTP API give them, so a local run and a
``--url`` run draw alike:

- classification (``predictions``): the top-k labels and scores written in the top-left corner;
- detection (``detections``): a box per detection in its label's colour, ``label score`` above it,
  and the landmarks (e.g. MTCNN's eyes, nose and mouth corners) as dots;
- segmentation (``masks``, also segment everything): each mask overlaid in colour, half opaque, with
  its outline; masks come as COCO ``rle``, a base64 ``png``, or the path of a PNG file (``png``);
- detect, then segment: the masks of each detection under its box.
"""
from __future__ import annotations

import base64
import binascii
import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct colours (Tableau 10), picked per label (detections) or per mask (segments).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MASK_ALPHA = 0.5


class NothingToDraw(ValueError):
    """An answer that has no picture (an embedding)."""


def label_colour(label: str) -> tuple[int, int, int]:
    """The same colour for the same label, in every image and every run."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _line_width(size: tuple[int, int]) -> int:
    return max(2, round(min(size) / 200))


def _font(size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(12, round(min(size) / 30)))


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
          font: Any, below: bool = False) -> None:
    """``text`` on a filled box of ``colour``, its bottom-left at ``xy`` (top-left with ``below``), kept inside."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0 + 4, y1 - y0 + 4
    width, height = draw.im.size
    x = min(max(0.0, xy[0]), max(0.0, width - w))
    y = xy[1] if below else xy[1] - h
    y = min(max(0.0, y), max(0.0, height - h))
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    light = sum(colour) > 382
    draw.text((x + 2 - x0, y + 2 - y0), text, fill=(0, 0, 0) if light else (255, 255, 255), font=font)


def mask_array(mask: dict[str, Any], size: tuple[int, int]) -> np.ndarray | None:
    """The HxW bool mask of one answer's mask entry (``rle``, base64 ``png`` or a PNG file), or None."""
    if mask.get("rle") is not None:
        from .masks import decode_rle

        return decode_rle(mask["rle"])
    png = mask.get("png")
    if not isinstance(png, str):
        return None
    path = Path(png)
    if len(png) < 4096 and path.is_file():
        data = path.read_bytes()
    else:
        try:
            data = base64.b64decode(png, validate=True)
        except (binascii.Error, ValueError):
            return None
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127
    return arr if arr.shape == size else None


def overlay_masks(image: np.ndarray, masks: list[np.ndarray], colours: list[tuple[int, int, int]]) -> np.ndarray:
    """``image`` with each mask blended in its colour and its outline drawn solid."""
    from scipy import ndimage

    out = image.astype(np.float32)
    for mask, colour in zip(masks, colours):
        if mask is None or not mask.any():
            continue
        out[mask] = out[mask] * (1 - MASK_ALPHA) + np.asarray(colour, np.float32) * MASK_ALPHA
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, _line_width(mask.shape) // 2))
        out[edge] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def _detection_masks(detections: list[dict[str, Any]], size: tuple[int, int]
                     ) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
    masks, colours = [], []
    for d in detections:
        for m in d.get("masks", [])[:1]:  # the best mask of each box (the first; multimask gives three)
            masks.append(mask_array(m, size))
            colours.append(label_colour(d.get("label", "")))
    return masks, colours


def draw_answer(image: np.ndarray, answer: dict[str, Any]) -> Image.Image:
    """The HxWx3 uint8 ``image`` with ``answer`` drawn on it (see the module's docstring)."""
    size = image.shape[:2]
    if "embedding" in answer:
        raise NothingToDraw("an embedding has no picture; --draw goes with classify, detect and segment")
    pixels = image
    if "masks" in answer:
        masks = [mask_array(m, size) for m in answer["masks"]]
        pixels = overlay_masks(image, masks, [PALETTE[i % len(PALETTE)] for i in range(len(masks))])
    detections = answer.get("detections", [])
    if any("masks" in d for d in detections):
        pixels = overlay_masks(image, *_detection_masks(detections, size))
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    font, width = _font(picture.size), _line_width(picture.size)
    for d in detections:
        colour = label_colour(d.get("label", ""))
        x0, y0, x1, y1 = d["box"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        for x, y in d.get("landmarks", []):
            r = width + 1
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
        _text(draw, (x0, y0), f"{d.get('label', '')} {d['score']:.2f}", colour, font)
    if "predictions" in answer:
        y = 0.0
        for p in answer["predictions"]:
            line = f"{p['score']:.2f} {p['label']}"
            _text(draw, (0, y), line, label_colour(p["label"]), font, below=True)
            y += draw.textbbox((0, 0), line, font=font)[3] + 6
    return picture


def drawn_name(path: str, taken: set[str]) -> str:
    """A PNG file name for the picture of ``path``: its stem, made unique among ``taken`` (then added to it)."""
    stem = Path(path).stem or "image"
    name, n = f"{stem}.png", 1
    while name in taken:
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name

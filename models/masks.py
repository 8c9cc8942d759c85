"""Mask encodings for HTTP answers: COCO RLE (pycocotools), PNG, polygons."""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

MASK_FORMATS = ("rle", "png", "polygons")


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    obj = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(obj).astype(bool)


def encode_png(mask: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours as flat [x0, y0, x1, y1, ...] lists (skimage's marching squares)."""
    from skimage import measure

    padded = np.pad(mask.astype(np.uint8), 1)
    polys = []
    for contour in measure.find_contours(padded, 0.5):
        if len(contour) < 3:
            continue
        xy = np.flip(contour - 1, axis=1).clip(min=0)  # (row, col) -> (x, y), undo the pad
        polys.append([round(float(v), 1) for v in xy.reshape(-1)])
    return polys


def mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def mask_to_json(mask: np.ndarray, score: float, fmt: str = "rle") -> dict[str, Any]:
    if fmt not in MASK_FORMATS:
        raise ValueError(f"Unknown mask format {fmt!r}; use one of {', '.join(MASK_FORMATS)}.")
    out: dict[str, Any] = {"score": round(float(score), 6), "area": int(mask.sum()), "bbox": mask_bbox(mask)}
    if fmt == "rle":
        out["rle"] = encode_rle(mask)
    elif fmt == "png":
        out["png"] = encode_png(mask)
    else:
        out["polygons"] = mask_polygons(mask)
    return out

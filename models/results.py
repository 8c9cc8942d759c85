"""Plain result objects; the HTTP layer calls ``to_json()`` and never touches tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Label:
    index: int
    label: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "score": round(float(self.score), 6)}


@dataclass
class Classification:
    top: list[Label]

    def to_json(self) -> dict[str, Any]:
        return {"predictions": [t.to_json() for t in self.top]}


@dataclass
class Detection:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in original-image pixels
    score: float
    label: str
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. face landmarks

    def to_json(self) -> dict[str, Any]:
        out = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 6),
               "label": self.label, "index": int(self.index)}
        out.update(self.extra)
        return out


@dataclass
class Detections:
    detections: list[Detection]
    image_size: tuple[int, int]              # (height, width)

    def to_json(self) -> dict[str, Any]:
        return {"detections": [d.to_json() for d in self.detections],
                "image_size": {"height": self.image_size[0], "width": self.image_size[1]}}


@dataclass
class Prompt:
    """One SAM prompt: points (pixels of the original image) with labels 1/0, and/or a box."""

    points: np.ndarray | None = None          # [P, 2] float (x, y)
    point_labels: np.ndarray | None = None    # [P] int, 1 foreground / 0 background
    box: np.ndarray | None = None             # [4] x0, y0, x1, y1
    multimask: bool = False


@dataclass
class ImageEmbedding:
    """A SAM image embedding plus what is needed to map masks back to the original image."""

    features: Any                             # np.ndarray float32 [1, C, h, w] (a torch.Tensor is accepted)
    original_size: tuple[int, int]            # (height, width)
    input_size: tuple[int, int]               # (height, width) after the longest-side resize
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. HQ-SAM interm embeddings

    def nbytes(self) -> int:
        f = self.features
        return int(f.numel() * f.element_size()) if hasattr(f, "numel") else int(np.asarray(f).nbytes)


@dataclass
class Masks:
    """Masks for one prompt, at the original image resolution."""

    masks: np.ndarray                         # [M, H, W] bool
    scores: np.ndarray                        # [M] predicted IoU
    low_res_logits: np.ndarray | None = None  # [M, 256, 256]

    def to_json(self, fmt: str = "rle") -> dict[str, Any]:
        from .masks import mask_to_json

        return {"masks": [mask_to_json(m, float(s), fmt) for m, s in zip(self.masks, self.scores)]}


@dataclass
class EverythingMask:
    """One mask of "segment everything": an object found by a grid point, without a prompt from the user."""

    rle: dict[str, Any]                       # COCO RLE {"size": [H, W], "counts": str} (``masks.encode_rle``)
    score: float                              # the decoder's predicted IoU
    stability_score: float                    # IoU of the mask thresholded at logit +offset and -offset
    area: int                                 # pixels
    bbox: tuple[int, int, int, int]           # x0, y0, x1, y1 (exclusive), like ``masks.mask_bbox``
    point: tuple[float, float]                # the grid point (x, y) that produced it, original-image pixels

    @property
    def mask(self) -> np.ndarray:
        """[H, W] bool."""
        from .masks import decode_rle

        return decode_rle(self.rle)

    def to_json(self, fmt: str = "rle") -> dict[str, Any]:
        from .masks import MASK_FORMATS, encode_png, mask_polygons

        if fmt not in MASK_FORMATS:
            raise ValueError(f"Unknown mask format {fmt!r}; use one of {', '.join(MASK_FORMATS)}.")
        out: dict[str, Any] = {"score": round(float(self.score), 6),
                               "stability_score": round(float(self.stability_score), 6), "area": int(self.area),
                               "bbox": [int(v) for v in self.bbox],
                               "point": [round(float(v), 2) for v in self.point]}
        if fmt == "rle":
            out["rle"] = dict(self.rle)
        elif fmt == "png":
            out["png"] = encode_png(self.mask)
        else:
            out["polygons"] = mask_polygons(self.mask)
        return out


@dataclass
class EverythingMasks:
    """The masks "segment everything" found on one image, largest first, no two overlapping above the
    NMS threshold (mask IoU)."""

    masks: list[EverythingMask]
    image_size: tuple[int, int]               # (height, width)
    points: int = 0                           # grid points decoded

    def to_json(self, fmt: str = "rle") -> dict[str, Any]:
        return {"masks": [m.to_json(fmt) for m in self.masks], "points": int(self.points)}

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

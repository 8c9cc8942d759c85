"""What every detector shares: argument checks, size grouping, and the result contract.

A detector subclass only says how to run one group of equal-sized images
(``_detect_group``) and returns raw boxes in original-image pixels. ``DetectionRunner``
turns those into ``Detections`` the same way for every model: boxes clipped to the image,
scores at or above ``score_threshold``, class-aware NMS at ``iou_threshold``, at most
``max_detections``, highest score first. Doing this in one place is what lets the HTTP
layer promise the same meaning of the three options for every detector.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..images import as_rgb_array
from ..registry import ModelSpec
from ..results import Detection, Detections
from ..runner import Runner


@dataclass
class RawDetections:
    """One image's detector output before the shared post-processing (tensors or arrays)."""

    boxes: Any                      # [N, 4] x0, y0, x1, y1 in original-image pixels
    scores: Any                     # [N]
    label_indices: Any              # [N] int, indices into the spec's labels
    extra: list[dict[str, Any]] | None = None   # per box, e.g. face landmarks
    image_size: tuple[int, int] = (0, 0)        # (height, width)


@dataclass(frozen=True)
class DetectArgs:
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    max_detections: int = 100


def check_detect_args(score_threshold: float, iou_threshold: float, max_detections: int) -> DetectArgs:
    """Validate the three detect options; a bad value is a ``ValueError`` that names it."""
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)):
        raise ValueError(f"max_detections must be an integer >= 1, got {max_detections!r}.")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections!r}.")
    return DetectArgs(float(score_threshold), float(iou_threshold), int(max_detections))


def prepare_image(image: Any, index: int) -> np.ndarray:
    """An HxWx3 uint8 array with at least one pixel; a ``TypeError``/``ValueError`` names the image."""
    try:
        arr = as_rgb_array(image)
    except TypeError as exc:
        raise TypeError(f"image {index}: {exc}") from None
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        arr = arr.copy()
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image {index} is empty ({arr.shape[0]}x{arr.shape[1]} pixels).")
    return arr


def group_indices(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def finalize(raw: RawDetections, labels: Sequence[str], args: DetectArgs) -> Detections:
    """Clip, threshold, class-aware NMS, cap and sort one image's raw detections."""
    import torch
    from torchvision.ops import batched_nms

    height, width = raw.image_size
    boxes = torch.as_tensor(raw.boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    scores = torch.as_tensor(raw.scores, dtype=torch.float32).reshape(-1).cpu()
    label_idx = torch.as_tensor(raw.label_indices, dtype=torch.int64).reshape(-1).cpu()
    # Not in place: the tensors may be inference tensors made under torch.inference_mode.
    upper = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), upper)
    keep = torch.nonzero(scores >= args.score_threshold).flatten()
    # batched_nms sorts by decreasing score, which is the order the result promises.
    kept = batched_nms(boxes[keep], scores[keep], label_idx[keep], args.iou_threshold)
    keep = keep[kept][: args.max_detections]
    out = []
    for i in keep.tolist():
        index = int(label_idx[i])
        label = labels[index] if 0 <= index < len(labels) else str(index)
        extra = dict(raw.extra[i]) if raw.extra is not None else {}
        out.append(Detection(box=tuple(float(v) for v in boxes[i].tolist()), score=float(scores[i]),
                             label=label, index=index, extra=extra))
    return Detections(detections=out, image_size=(int(height), int(width)))


class DetectionRunner(Runner, ABC):
    """Base runner: validates, groups images so batching never changes a result, post-processes.

    Subclasses implement ``_detect_group(images, args) -> list[RawDetections]`` for a list of
    images that share a ``_group_key``.
    """

    def __init__(self, spec: ModelSpec, device: str = "cpu", weights_path: Path | None = None):
        super().__init__(spec, device=device, weights_path=weights_path)
        # The torch modules are shared by the threads of one replica; a call runs alone.
        self._lock = threading.Lock()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.spec.labels or ())

    def _group_key(self, image: np.ndarray) -> Hashable:
        # Batching pads images to the largest one, which changes features near the border;
        # images of one size are never padded, so a batch gives the one-by-one answer.
        return image.shape[:2]

    @abstractmethod
    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        """Raw detections for images of one group key, in the order given."""

    def detect(self, images: Sequence[np.ndarray], score_threshold: float = 0.5, iou_threshold: float = 0.5,
               max_detections: int = 100) -> list[Detections]:
        """Detections per image, boxes (x0, y0, x1, y1) in original-image pixels, best first."""
        args = check_detect_args(score_threshold, iou_threshold, max_detections)
        arrays = [prepare_image(im, i) for i, im in enumerate(images)]
        results: list[Detections | None] = [None] * len(arrays)
        with self._lock:
            for group in group_indices([self._group_key(a) for a in arrays]):
                raws = self._detect_group([arrays[i] for i in group], args)
                for i, raw in zip(group, raws, strict=True):
                    raw.image_size = arrays[i].shape[:2]
                    results[i] = finalize(raw, self.labels, args)
        return results  # type: ignore[return-value]

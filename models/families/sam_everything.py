"""Segment everything: segment-anything's automatic mask generator, over an embedding already computed.

For any ``SamRunner`` (both backends; a decoder with SAM's three multimask outputs or with one
mask per prompt), as ``SamAutomaticMaskGenerator`` does it on one crop (the whole image):

1. a grid of ``points_per_side``² foreground clicks (``build_point_grid``: cell centres), decoded
   ``points_per_batch`` at a time in one batched decoder call each (``SamRunner.point_candidates``);
2. every candidate mask whose predicted IoU is above ``pred_iou_thresh`` is upscaled to the image's
   size as logits, and kept when its stability score (``calculate_stability_score``: the IoU of the
   mask thresholded at ``mask_threshold ± stability_score_offset``) reaches ``stability_score_thresh``
   and its area reaches ``min_mask_area`` (never an empty mask); kept masks are stored as COCO RLE
   at once, so memory holds RLEs, not a stack of full-size masks;
3. duplicates are removed by greedy NMS on the masks themselves, best predicted IoU first: no two
   masks of the answer have a mask IoU above ``nms_thresh``. segment-anything runs NMS on the masks'
   boxes, which does not bound the masks' overlap (a blob with one stray pixel far away has a large
   box); here boxes and areas only bound the IoU from above, to skip the exact RLE IoU
   (pycocotools) of pairs that cannot overlap that much;
4. the answer is sorted largest first, cut to ``max_masks``.

Crop layers and ``min_mask_region_area`` (hole filling with OpenCV) of segment-anything are not done.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..results import EverythingMask, EverythingMasks, ImageEmbedding

log = logging.getLogger(__name__)

# Candidate masks upscaled to the image's size at once (as logits: 16 x 4 MP x 4 B = 256 MiB at most).
UPSCALE_CHUNK = 16


class PointDecoder(Protocol):
    """What segment everything needs of a ``SamRunner`` (named here: ``sam`` imports this module)."""

    name: str
    mask_threshold: float

    def point_candidates(self, embedding: ImageEmbedding, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def upscale_logits(self, low_res: Any, input_size: tuple[int, int], original_size: tuple[int, int]) -> Any: ...


@dataclass(frozen=True)
class EverythingOptions:
    """The knobs of segment everything; defaults are ``SamAutomaticMaskGenerator``'s. Checked on creation
    (``ValueError`` naming the option)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    nms_thresh: float = 0.7
    min_mask_area: int = 0
    max_mask_fraction: float = 0.95           # a mask of (nearly) the whole image is background, not an object
    max_masks: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("points_per_side", 1), ("points_per_batch", 1), ("min_mask_area", 0)):
            _check_int(name, getattr(self, name), low)
        if self.max_masks is not None:
            _check_int("max_masks", self.max_masks, 1)
        for name in ("pred_iou_thresh", "stability_score_thresh", "nms_thresh"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}.")
        if not _is_number(self.max_mask_fraction) or not 0.0 < self.max_mask_fraction <= 1.0:
            raise ValueError(f"max_mask_fraction must be a number in (0, 1], got {self.max_mask_fraction!r}.")
        if not _is_number(self.stability_score_offset) or self.stability_score_offset < 0:
            raise ValueError(f"stability_score_offset must be a number >= 0, got {self.stability_score_offset!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


@dataclass
class _Candidate:
    found: EverythingMask
    coco_rle: dict[str, Any]                  # pycocotools' own form (bytes counts), for its IoU


def grid_points(points_per_side: int, image_size: tuple[int, int]) -> np.ndarray:
    """[n², 2] (x, y) pixels of the original image: segment-anything's grid of cell centres, row by row."""
    from segment_anything.utils.amg import build_point_grid

    height, width = image_size
    return build_point_grid(points_per_side) * np.array([width, height], np.float64)


def segment_everything(runner: PointDecoder, embedding: ImageEmbedding, options: EverythingOptions) -> EverythingMasks:
    """Every object on the image of ``embedding`` (see the module docstring); an image with nothing in it
    gives an empty list."""
    from segment_anything.utils.amg import batch_iterator

    size = (int(embedding.original_size[0]), int(embedding.original_size[1]))
    points = grid_points(options.points_per_side, size)
    candidates: list[_Candidate] = []
    for (batch,) in batch_iterator(options.points_per_batch, points):
        low_res, iou = runner.point_candidates(embedding, batch)
        candidates += _filter(runner, embedding, batch, low_res, iou, options)
    kept = mask_nms(candidates, options.nms_thresh)
    kept.sort(key=lambda m: -m.area)  # stable: equal areas stay best score first
    if options.max_masks is not None:
        kept = kept[:options.max_masks]
    log.debug("%s: segment everything kept %d of %d candidate masks from %d points", runner.name, len(kept),
              len(candidates), len(points))
    return EverythingMasks(masks=kept, image_size=size, points=len(points))


def _filter(runner: PointDecoder, embedding: ImageEmbedding, points: np.ndarray, low_res: np.ndarray, iou: np.ndarray,
            options: EverythingOptions) -> list[_Candidate]:
    """The candidates of one decoder batch that pass the predicted-IoU, stability and area filters."""
    import torch
    from pycocotools import mask as mask_utils
    from segment_anything.utils.amg import calculate_stability_score

    per_point = iou.shape[1]
    logits = low_res.reshape(-1, *low_res.shape[2:])
    scores = iou.reshape(-1)
    origins = np.repeat(points, per_point, axis=0)
    rows = np.arange(len(scores))
    if options.pred_iou_thresh > 0:  # as segment-anything: a threshold of 0 keeps every prediction
        rows = rows[scores > options.pred_iou_thresh]
    out: list[_Candidate] = []
    threshold = runner.mask_threshold
    for start in range(0, len(rows), UPSCALE_CHUNK):
        chunk = rows[start:start + UPSCALE_CHUNK]
        upscaled = runner.upscale_logits(torch.from_numpy(logits[chunk]), embedding.input_size,
                                         embedding.original_size)
        stability = calculate_stability_score(upscaled, threshold, options.stability_score_offset)
        masks = upscaled > threshold
        areas = masks.flatten(1).sum(1)
        keep = areas >= max(1, options.min_mask_area)
        if options.max_mask_fraction < 1.0:
            keep &= areas <= options.max_mask_fraction * masks.shape[-1] * masks.shape[-2]
        if options.stability_score_thresh > 0:
            keep &= stability >= options.stability_score_thresh
        if not bool(keep.any()):
            continue
        chosen = masks[keep].cpu().numpy()
        rles = mask_utils.encode(np.asfortranarray(chosen.transpose(1, 2, 0).astype(np.uint8)))
        boxes = mask_utils.toBbox(rles)  # x, y, w, h
        for rle, box, row, stable, area in zip(rles, boxes, chunk[keep.cpu().numpy()],
                                               stability[keep].cpu().tolist(), areas[keep].cpu().tolist()):
            x, y, w, h = (int(round(v)) for v in box)
            found = EverythingMask(rle={"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                                   score=float(scores[row]), stability_score=float(stable), area=int(area),
                                   bbox=(x, y, x + w, y + h), point=(float(origins[row][0]), float(origins[row][1])))
            out.append(_Candidate(found, rle))
    return out


def mask_nms(candidates: list[_Candidate], nms_thresh: float) -> list[EverythingMask]:
    """Greedy NMS on masks, best predicted IoU first: a mask is dropped when its IoU with a kept one is
    above ``nms_thresh``. The exact IoU (pycocotools, on RLEs) is computed only where the bound from
    the boxes and areas (intersection <= min(box overlap, either area)) could exceed the threshold."""
    from pycocotools import mask as mask_utils

    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].found.score)
    kept: list[_Candidate] = []
    boxes = np.zeros((len(candidates), 4))
    areas = np.zeros(len(candidates))
    for candidate in (candidates[i] for i in order):
        box, area = np.asarray(candidate.found.bbox, float), float(candidate.found.area)
        n = len(kept)
        if n:
            overlap_w = np.clip(np.minimum(boxes[:n, 2], box[2]) - np.maximum(boxes[:n, 0], box[0]), 0, None)
            overlap_h = np.clip(np.minimum(boxes[:n, 3], box[3]) - np.maximum(boxes[:n, 1], box[1]), 0, None)
            most = np.minimum(np.minimum(overlap_w * overlap_h, areas[:n]), area)
            near = np.flatnonzero(most / (areas[:n] + area - most) > nms_thresh)
            if near.size and np.max(mask_utils.iou([candidate.coco_rle], [kept[j].coco_rle for j in near],
                                                   [0] * near.size)) > nms_thresh:
                continue
        boxes[n], areas[n] = box, area
        kept.append(candidate)
    return [c.found for c in kept]
